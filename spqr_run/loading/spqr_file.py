"""The `.spqr` container: one safetensors file (no pickle, mmap-able) with everything a model needs.

The safetensors header's `__metadata__` holds one key, `spqr`, whose value is a JSON object:
format name and version, the model config, the quantization config, the tokenizer, generation defaults,
each quantized linear's `LinearMeta`, and a summary (bits, outliers, calibration). Tensors: dense fp16
`embed_tokens.weight`, norms, `lm_head.weight` and linear biases under their canonical names, and per
quantized linear `{module}.{tiles,outliers,outlier_row_ptr,perm}` (spqr) or `{module}.{codes,scales,zeros,perm}`
(gptq/rtn) in the packed layout of `spqr_run.quant` (docs/FORMAT.md). Format 1 files (spqr linears in the
older tile layout) are converted on load, exactly (`spqr_run.quant.format_v1`).

Writing streams tensors one at a time straight into a temporary file that is renamed when complete, so a
model larger than host memory can be written and a crash never leaves a partial `.spqr` behind.

Checksums: the header's optional `checksums` object holds the CRC-32 of every tensor's bytes (`zlib.crc32`,
~3 GiB/s on one core), written with the file and checked each time a tensor is read from it, so a flipped
byte is refused with one line naming the tensor instead of quietly making the model worse. Files written
before checksums existed have no such field and load unchecked; `verify=False` skips the check.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from spqr_run.config import ModelConfig
from spqr_run.errors import DiskFullError, ModelFormatError, check_free_space, is_disk_full

FORMAT_NAME = "spqr"
# 2 (written): spqr linears in 16 x 64 mma-fragment records (docs/FORMAT.md);
# 1: spqr linears in 16 x 16 row-major tiles, converted on load (spqr_run/quant/format_v1.py)
FORMAT_VERSION = 3
OLDEST_READABLE_VERSION = 1
DENSE_DTYPE = torch.float16
CHECKSUM_ALGORITHM = "crc32"
_ST_DTYPES = {
    torch.float16: "F16", torch.float32: "F32", torch.int32: "I32", torch.int16: "I16",
    torch.uint8: "U8", torch.int64: "I64", torch.bfloat16: "BF16",
}  # fmt: skip


def write_spqr(
    path: Path,
    header: dict[str, Any],
    tensors: Iterable[tuple[str, Callable[[], Tensor]]],
    *,
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None,
) -> int:
    """Write a `.spqr` file: `header` (JSON-serialisable) and tensors given as (name, loader) pairs, loaded
    one at a time. Returns the file size in bytes. The file appears under `path` only once complete.

    The header's index needs every tensor's dtype and shape before the first byte is written: a tensor named
    in `specs` (name -> (dtype, shape)) is taken from there and loaded once (its CRC-32 is computed as it is
    written, and the header rewritten in place: a checksum has a fixed width); any other is loaded once for
    its size and checksum and again when written (memory stays at one tensor either way; the second read
    must match). A loader must return what its spec says.

    The header gets a `checksums` field with each tensor's CRC-32 (replacing any `checksums` in `header`).
    The free space is checked before anything is written; DiskFullError (one line: the file, the bytes
    needed, those free) when there is too little, or when the disk fills up meanwhile."""
    path = Path(path)
    specs = specs or {}
    entries: list[tuple[str, Callable[[], Tensor], str, list[int], int]] = []
    sums: dict[str, str] = {}
    offset = 0
    for name, load in tensors:
        if name in specs:
            dtype, shape = specs[name]
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            entries.append((name, load, _ST_DTYPES[dtype], list(shape), nbytes))
            sums[name] = "0" * 8  # placeholder of the same width, filled in once the tensor is written
            offset += nbytes
            continue
        t = load()  # loaded once for its size and checksum, then again when written (memory: one tensor)
        nbytes = t.numel() * t.element_size()
        entries.append((name, load, _ST_DTYPES[t.dtype], list(t.shape), nbytes))
        sums[name] = tensor_checksum(t)
        offset += nbytes
        del t
    base = {k: v for k, v in header.items() if k != "checksums"}

    def header_blob() -> bytes:
        meta = {
            "spqr": json.dumps(
                {
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    **base,
                    "checksums": {"algorithm": CHECKSUM_ALGORITHM, "tensors": sums},
                }
            )
        }
        index: dict[str, Any] = {"__metadata__": meta}
        start = 0
        for name, _, dtype, shape, nbytes in entries:
            index[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + nbytes]}
            start += nbytes
        blob = json.dumps(index, separators=(",", ":")).encode()
        return blob + b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned

    blob = header_blob()
    total = 8 + len(blob) + offset
    check_free_space(path, total)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, load, dtype, shape, nbytes in entries:
                t = load().contiguous().cpu()
                if list(t.shape) != shape or _ST_DTYPES[t.dtype] != dtype:
                    raise RuntimeError(f"tensor {name} changed shape or dtype while writing")
                if name in specs:
                    sums[name] = tensor_checksum(t)
                elif tensor_checksum(t) != sums[name]:
                    raise RuntimeError(f"tensor {name} changed between its two reads while writing")
                data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
                assert len(data) == nbytes
                f.write(data)
            if specs:
                final = header_blob()
                assert len(final) == len(blob)  # checksums have a fixed width
                f.seek(8)
                f.write(final)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFullError(path, total) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


def tensor_checksum(t: Tensor) -> str:
    """CRC-32 of a tensor's bytes (C order, as stored in the file), 8 hex digits."""
    t = t.detach().contiguous().cpu()
    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    return f"{zlib.crc32(data):08x}"


def read_checksums(path: Path, header: dict[str, Any]) -> dict[str, str]:
    """Tensor name -> stored CRC-32 from a header ({} for files written before checksums existed)."""
    field = header.get("checksums")
    if field is None:
        return {}
    if (
        not isinstance(field, dict)
        or field.get("algorithm") != CHECKSUM_ALGORITHM
        or not isinstance(field.get("tensors"), dict)
        or not all(isinstance(v, str) for v in field["tensors"].values())
    ):
        raise ModelFormatError(
            f"{path}: header field 'checksums' is not {{'algorithm': '{CHECKSUM_ALGORITHM}', 'tensors': "
            "{name: hex}}"
        )
    return dict(field["tensors"])


def read_header(path: Path) -> dict[str, Any]:
    """The validated top-level `spqr` header of a file (raises ModelFormatError with one line)."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ModelFormatError(f"{path}: corrupt or truncated .spqr file ({e})") from None
    raw = meta.get("spqr")
    if raw is None:
        raise ModelFormatError(f"{path}: not a .spqr file (no 'spqr' header; a plain safetensors file?)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{path}: corrupt .spqr header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{path}: not a .spqr file (header 'format' is not 'spqr')")
    version = header.get("format_version")
    if not isinstance(version, int):
        raise ModelFormatError(f"{path}: header field 'format_version' is missing or not an integer")
    if version > FORMAT_VERSION:
        raise ModelFormatError(
            f"{path}: format version {version} is newer than this spqr-run reads ({FORMAT_VERSION}); upgrade spqr-run"
        )
    if version < OLDEST_READABLE_VERSION:
        raise ModelFormatError(
            f"{path}: format version {version} is no longer supported (this spqr-run reads "
            f"{OLDEST_READABLE_VERSION} to {FORMAT_VERSION}); quantize the model again with spqr-quantize"
        )
    for key, kind in (("model_config", dict), ("quant_config", dict), ("tokenizer", dict), ("linears", dict)):
        if not isinstance(header.get(key), kind):
            raise ModelFormatError(f"{path}: header field {key!r} is missing or not an object")
    return header


class SpqrWeights(Mapping[str, Tensor]):
    """Dense tensors of a `.spqr` file (fp16), read lazily from the mmap'd file (and checked against
    `checksums`, name -> CRC-32, when given)."""

    def __init__(self, path: Path, names: list[str], checksums: Mapping[str, str] | None = None) -> None:
        self.path, self._names, self.checksums = path, names, checksums or {}

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._names:
            raise KeyError(name)
        return _read(self.path, [name], self.checksums)[name]


def _read(path: Path, names: list[str], checksums: Mapping[str, str]) -> dict[str, Tensor]:
    """The tensors `names` of a file, each checked against its stored CRC-32 when `checksums` has one."""
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {n: f.get_tensor(n) for n in names}
    except Exception as e:
        raise ModelFormatError(f"{path}: cannot read tensor(s) {names[0]!r}... ({e})") from None
    for name, t in tensors.items():
        expected = checksums.get(name)
        if expected is not None and tensor_checksum(t) != expected:
            raise ModelFormatError(
                f"{path}: tensor {name!r} is corrupt (its CRC-32 differs from the one stored when the file was "
                "written); restore or re-create the file, or load it anyway with --skip-checksums"
            )
    return tensors


def open_spqr(path: Path, *, verify: bool = True):
    """Open a `.spqr` file as a ModelSource whose quantized linears are built by `linear_factory`.

    Every tensor read from it is checked against the CRC-32 stored in its header (files written before
    checksums existed have none); `verify=False` skips the check."""
    from spqr_run.loading import ModelSource
    from spqr_run.models.spqr_linear import SpQRLinear
    from spqr_run.quant import LinearMeta, QuantConfig, QuantizedLinear
    from spqr_run.quant.format_v1 import convert_v1_tensors
    from spqr_run.quant.format_v2 import convert_v2_tensors
    from spqr_run.sampling import clean_model_defaults
    from spqr_run.tokenizer import Tokenizer

    header = read_header(path)
    checksums = read_checksums(path, header) if verify else {}
    src = str(path)
    version = header["format_version"]
    cfg = ModelConfig.from_dict(header["model_config"], source=f"{src} model_config")
    qcfg = QuantConfig.from_dict(header["quant_config"], source=f"{src} quant_config")
    tokenizer = Tokenizer.from_json_dict(header["tokenizer"], source=f"{src} tokenizer")
    expected = {
        f"layers.{i}.{name}": shape
        for i in range(cfg.num_layers)
        for name, shape in cfg.linear_shapes().items()
    }
    metas: dict[str, LinearMeta] = {}
    for name, meta in header["linears"].items():
        if name not in expected:
            raise ModelFormatError(f"{path}: header lists unknown linear {name!r}")
        if version == 1 and isinstance(meta, dict) and meta.get("method") == "spqr":
            if (meta.get("groupsize"), meta.get("stat_groupsize")) != (16, 16):
                raise ModelFormatError(
                    f"{path}: format 1 linear {name!r} has groupsize {meta.get('groupsize')} / stat_groupsize "
                    f"{meta.get('stat_groupsize')}; format 3 needs 16 / 16: quantize the model again"
                )
        m = LinearMeta.from_dict(meta, source=f"{src} linear {name}")
        if (m.out_features, m.in_features) != expected[name]:
            raise ModelFormatError(
                f"{path}: linear {name!r} is {m.out_features}x{m.in_features}, config implies "
                f"{expected[name][0]}x{expected[name][1]}"
            )
        metas[name] = m
    with safe_open(path, framework="pt") as f:
        names = list(f.keys())
    packed: dict[str, list[str]] = {}
    dense: list[str] = []
    for n in names:
        module, _, field = n.rpartition(".")
        if module in metas and field != "bias":
            packed.setdefault(module, []).append(n)
        else:
            dense.append(n)

    def linear_factory(name: str) -> nn.Module | None:
        if name not in metas:
            return None
        read = _read(path, packed.get(name, []), checksums)
        tensors = {k.rpartition(".")[2]: v for k, v in read.items()}
        source = f"{src} {name}"
        if version == 1:
            source += " (format 1)"
            tensors = convert_v1_tensors(tensors, metas[name], source)
        elif version == 2:
            source += " (format 2)"
            tensors = convert_v2_tensors(tensors, metas[name])
        q = QuantizedLinear.from_tensors(tensors, meta=metas[name], source=source)
        bias = None
        if f"{name}.bias" in dense:
            bias = _read(path, [f"{name}.bias"], checksums)[f"{name}.bias"]
        return SpQRLinear(q, bias)

    weights = SpqrWeights(path, [n for n in dense if n.rpartition(".")[0] not in metas], checksums)
    summary = header.get("summary") if isinstance(header.get("summary"), dict) else {}
    info = {"quant_config": qcfg, "file_bytes": path.stat().st_size, **summary}
    if isinstance(summary.get("avg_bits"), (int, float)):
        info["bits_per_param"] = summary["avg_bits"]  # of the quantized linears, every stored byte counted
    raw_defaults = header.get("generation_defaults")
    gen_defaults = (
        clean_model_defaults(raw_defaults, source=f"{src} generation_defaults")
        if isinstance(raw_defaults, dict)
        else {}
    )
    return ModelSource(path, "spqr", cfg, weights, tokenizer, gen_defaults, linear_factory, info)
