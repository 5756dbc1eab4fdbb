"""ctypes binding of the native CPU kernels (kernels/cpu/spqr_cpu.h): loading, ISA and thread control, and
the C structs, mirrored field for field.

The library is a plain shared object built at `pip install` (`setup.py`, `spqr_run.cpu.build`): no libtorch,
so one build serves every torch version; tensors are passed as `data_ptr()`s. `load()` finds it once and
returns None, with `unavailable_reason()` saying why, when it is missing or was built for another ABI; callers
then keep the decode-to-fp16 path.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import warnings
from ctypes import POINTER, c_char_p, c_float, c_int, c_int32, c_int64, c_void_p
from dataclasses import dataclass
from pathlib import Path

ABI_VERSION = 6
ISA_NAMES = {0: "portable C", 1: "AVX2", 2: "AVX-512 VNNI"}
LIB_ENV = "SPQR_CPU_LIB"  # path of a library to load instead of the installed one (tests: sanitizer builds)

# weight kinds (enum spqr_weight_kind)
W_NONE, W_SPQR, W_F32, W_F16, W_Q8 = 0, 1, 2, 3, 4
# KV cache kinds (enum spqr_kv_kind)
KV_F32, KV_INT8, KV_F16 = 0, 1, 2


class Weight(ctypes.Structure):
    """struct spqr_weight."""

    _fields_ = [
        ("kind", c_int32),
        ("out_features", c_int32),
        ("in_features", c_int32),
        ("wbits", c_int32),
        ("stat_bits", c_int32),
        ("row_tiles", c_int32),
        ("k_blocks", c_int32),
        ("act_residual", c_int32),
        ("codes", c_void_p),
        ("stats", c_void_p),
        ("outlier_cols", c_void_p),
        ("outlier_vals", c_void_p),
        ("outlier_row_ptr", c_void_p),
        ("perm", c_void_p),
        ("scales", c_void_p),
        ("dense", c_void_p),
        ("bias", c_void_p),
    ]


MAX_IN_PROJ = 5


class Layer(ctypes.Structure):
    """struct spqr_layer."""

    _fields_ = [
        ("attn_norm_w", c_void_p),
        ("attn_norm_b", c_void_p),
        ("mlp_norm_w", c_void_p),
        ("mlp_norm_b", c_void_p),
        ("in_proj", Weight * MAX_IN_PROJ),
        ("in_proj_src", c_int32 * MAX_IN_PROJ),
        ("n_in_proj", c_int32),
        ("o_proj", Weight),
        ("down_proj", Weight),
        ("k_cache", c_void_p),
        ("v_cache", c_void_p),
        ("k_scale", c_void_p),
        ("v_scale", c_void_p),
    ]


class Model(ctypes.Structure):
    """struct spqr_model."""

    _fields_ = [
        ("hidden", c_int32),
        ("ffn", c_int32),
        ("n_layers", c_int32),
        ("n_heads", c_int32),
        ("n_kv_heads", c_int32),
        ("head_dim", c_int32),
        ("vocab", c_int32),
        ("norm_rms", c_int32),
        ("mlp_gated", c_int32),
        ("parallel", c_int32),
        ("norm_eps", c_float),
        ("kv_kind", c_int32),
        ("kv_rows", c_int32),
        ("kv_max_seq", c_int32),
        ("rope_cos", c_void_p),
        ("rope_sin", c_void_p),
        ("rope_max_pos", c_int32),
        ("embed", Weight),
        ("lm_head", Weight),
        ("final_norm_w", c_void_p),
        ("final_norm_b", c_void_p),
        ("layers", POINTER(Layer)),
    ]


_SIGNATURES = {
    "spqr_cpu_abi_version": (c_int, []),
    "spqr_cpu_source_hash": (c_char_p, []),
    "spqr_cpu_best_isa": (c_int, []),
    "spqr_cpu_set_isa": (c_int, [c_int]),
    "spqr_cpu_isa": (c_int, []),
    "spqr_cpu_set_threads": (c_int, [c_int, c_int]),
    "spqr_cpu_set_serial": (None, [c_int]),
    "spqr_cpu_threads": (c_int, []),
    "spqr_cpu_stat_block_bytes": (c_int32, [c_int32]),
    "spqr_cpu_repack": (c_int, [c_void_p, c_int32, c_int32, c_int32, c_int32, c_void_p, c_void_p]),
    "spqr_cpu_q8_rows": (None, [POINTER(Weight), c_void_p, c_int32, c_void_p]),
    "spqr_cpu_matmul": (c_int, [POINTER(Weight), c_void_p, c_int64, c_void_p, c_int64, c_int32]),
    "spqr_cpu_quantize_rows": (None, [c_void_p, c_int64, c_int32, c_int32, c_void_p, c_void_p, c_void_p]),
    "spqr_cpu_forward": (
        c_int,
        [POINTER(Model), c_void_p, c_void_p, c_void_p, c_int32, c_int32, c_int32, c_void_p],
    ),
}


def library_path() -> Path | None:
    """The library to load: $SPQR_CPU_LIB, else the one `pip install` built next to this module."""
    env = os.environ.get(LIB_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_spqr_cpu{suffix}"
        if path.exists():
            return path
    return None


@dataclass(frozen=True)
class NativeLib:
    cdll: ctypes.CDLL
    path: Path

    def __getattr__(self, name: str):  # the C functions, typed
        return getattr(self.cdll, name)


_reason: list[str] = []


@functools.cache
def load() -> NativeLib | None:
    """The native library, typed and initialised, or None (see `unavailable_reason`)."""
    path = library_path()
    if path is None:
        _reason.append(
            "the native CPU kernels were not built at install (no C compiler then?); "
            "install gcc and reinstall: pip install -e ."
        )
        return None
    try:
        cdll = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(cdll, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, AttributeError) as e:
        _reason.append(f"the native CPU kernels at {path} could not be loaded ({e})")
        return None
    if cdll.spqr_cpu_abi_version() != ABI_VERSION:
        _reason.append(
            f"the native CPU kernels at {path} were built for another version; reinstall: pip install -e ."
        )
        return None
    _warn_if_stale(cdll, path)
    return NativeLib(cdll, path)


def _warn_if_stale(cdll: ctypes.CDLL, path: Path) -> None:
    """An editable install whose kernel sources changed after the build: say so once (results may differ)."""
    from spqr_run.cpu.build import KERNELS_DIR, source_hash

    if not KERNELS_DIR.is_dir() or os.environ.get(LIB_ENV):
        return
    try:
        current = source_hash()
    except OSError:
        return
    built = cdll.spqr_cpu_source_hash().decode()
    if built != current:
        warnings.warn(
            f"spqr-run: the native CPU kernels ({path.name}) were built from other sources than "
            f"{KERNELS_DIR}; rebuild them with: pip install -e .",
            RuntimeWarning,
            stacklevel=3,
        )


def unavailable_reason() -> str | None:
    """Why `load()` returned None (one line), or None when it loaded."""
    return None if load() is not None else (_reason[-1] if _reason else "unknown")


def isa_name(isa: int | None = None) -> str:
    lib = load()
    if lib is None:
        return "none"
    return ISA_NAMES.get(lib.spqr_cpu_isa() if isa is None else isa, "?")
