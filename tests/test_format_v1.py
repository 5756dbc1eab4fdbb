"""Format 1 `.spqr` files load through the exact v1 -> v2 converter (spqr_run/quant/format_v1.py).

The format 1 tensors are made here by a small writer of the old layout (16 x 16 tiles, row-major codes as
one little-endian bit stream, stats = 16 scale then 16 zero codes), independent of the converter's reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import spqr_run.loading.spqr_file as sf
from spqr_run.errors import ModelFormatError
from spqr_run.loading import open_model
from spqr_run.quant import QuantizedLinear
from spqr_run.quant.format_v1 import convert_v1_tensors
from spqr_run.quant.packing import coo_to_csr, encode_columns, pack_bits
from tests.test_packing import random_unpacked
from tests.test_quantize_model import _quantize, tiny_model  # noqa: F401  (pytest fixture)


def _tiles(x: torch.Tensor, cols: int) -> torch.Tensor:
    """(out, n) -> (RT, CT, 16*cols) zero-padded 16-row x `cols`-column tiles, each row-major."""
    rt, ct = -(-x.shape[0] // 16), -(-x.shape[1] // cols)
    x = torch.nn.functional.pad(x, (0, ct * cols - x.shape[1], 0, rt * 16 - x.shape[0]))
    return x.reshape(rt, 16, ct, cols).permute(0, 2, 1, 3).reshape(rt, ct, 16 * cols)


def v1_tensors(q: QuantizedLinear) -> dict[str, torch.Tensor]:
    """The format 1 tensors of an spqr linear (the old writer, kept only here)."""
    u = q.unpack()
    m = u.meta
    codes = pack_bits(_tiles(u.codes, 16), m.wbits)  # (RT, CT, 8*wbits)
    stats = pack_bits(torch.cat([_tiles(u.scale_codes, 1), _tiles(u.zero_codes, 1)], dim=-1), m.stat_bits)
    row_ptr, cols, values = coo_to_csr(u.outlier_rows, u.outlier_cols, u.outlier_values, m.out_features)
    t = {"codes": codes, "stats": stats, "second": u.second.half(), "outlier_values": values}
    t |= {"outlier_cols": cols, "outlier_row_ptr": row_ptr}
    if u.perm is not None:
        t["perm"] = encode_columns(u.perm)
    return t


@pytest.mark.parametrize("wbits", [2, 3, 4])
@pytest.mark.parametrize(("out", "inp"), [(37, 150), (16, 64), (48, 40001)])
def test_converter_is_exact(wbits, out, inp):
    u = random_unpacked("spqr", out, inp, wbits, 16, nnz=min(50, out * inp // 10), seed=wbits + out)
    if inp > 32768:  # outliers in high columns: unsigned 16-bit reading
        u.outlier_rows, u.outlier_cols = torch.tensor([0, 5, 47]), torch.tensor([32768, 40000, 1])
        u.outlier_values = torch.tensor([1.0, -2.0, 0.5]).half()
    q = QuantizedLinear.pack(u)
    v2 = convert_v1_tensors(v1_tensors(q), q.meta, "t")
    assert set(v2) == set(q.tensors())
    for name, t in q.tensors().items():
        assert torch.equal(v2[name], t), name
    loaded = QuantizedLinear.from_tensors(v2, meta=q.meta, source="t")
    assert torch.equal(loaded.dequantize(), q.dequantize())


def test_converter_rejects_bad_v1_tensors_naming_them():
    q = QuantizedLinear.pack(random_unpacked("spqr", 20, 40, 3, 16, nnz=4, seed=1))
    good = v1_tensors(q)
    with pytest.raises(ModelFormatError, match="f.spqr x: format 1 tensor 'stats' is torch.int32"):
        convert_v1_tensors({**good, "stats": good["stats"][:, :, :1]}, q.meta, "f.spqr x")
    with pytest.raises(ModelFormatError, match="missing tensor 'second'"):
        convert_v1_tensors({k: v for k, v in good.items() if k != "second"}, q.meta, "f.spqr x")
    with pytest.raises(ModelFormatError, match="unexpected tensor.*tiles"):
        convert_v1_tensors({**good, "tiles": q.tiles}, q.meta, "f.spqr x")
    with pytest.raises(ModelFormatError, match="outlier_row_ptr"):
        convert_v1_tensors({**good, "outlier_row_ptr": good["outlier_row_ptr"] * 0}, q.meta, "f.spqr x")
    inf_second = {**good, "second": torch.full_like(good["second"], float("inf"))}
    with pytest.raises(ModelFormatError, match="f.spqr x.*inf or nan"):
        QuantizedLinear.from_tensors(
            convert_v1_tensors(inf_second, q.meta, "f.spqr x"), meta=q.meta, source="f.spqr x"
        )


def _rewrite(src: Path, dst: Path, version: int, change_tensor=None) -> None:
    """Copy `src` to `dst` with header format_version `version` and each tensor through `change_tensor`."""
    with safe_open(src, framework="pt") as f:
        header = json.loads(f.metadata()["spqr"])
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    header.pop("format")
    header.pop("format_version")
    if change_tensor is not None:
        tensors = change_tensor(header, tensors)
    old = sf.FORMAT_VERSION
    sf.FORMAT_VERSION = version
    try:
        sf.write_spqr(dst, header, [(n, lambda t=t: t) for n, t in tensors.items()])
    finally:
        sf.FORMAT_VERSION = old


@pytest.fixture(scope="module")
def v2_file(tiny_model, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("v2") / "model.spqr"
    _quantize(tiny_model, out)
    return out


def _to_v1(header: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from spqr_run.quant import LinearMeta

    result = {
        n: t
        for n, t in tensors.items()
        if n.rpartition(".")[0] not in header["linears"] or n.endswith(".bias")
    }
    for name, meta in header["linears"].items():
        parts = {
            k: tensors[f"{name}.{k}"]
            for k in ("tiles", "outliers", "outlier_row_ptr", "perm")
            if f"{name}.{k}" in tensors
        }
        q = QuantizedLinear.from_tensors(parts, meta=LinearMeta.from_dict(meta), source=name)
        result |= {f"{name}.{k}": v for k, v in v1_tensors(q).items()}
    return result


def test_format_1_file_loads_bit_identical_to_format_2(v2_file, tmp_path):
    v1_file = tmp_path / "old.spqr"
    _rewrite(v2_file, v1_file, 1, _to_v1)
    assert sf.read_header(v1_file)["format_version"] == 1
    with safe_open(v1_file, framework="pt") as f:
        assert any(n.endswith(".stats") for n in f.keys()) and not any(n.endswith(".tiles") for n in f.keys())
    new, old = open_model(v2_file), open_model(v1_file)
    names = list(sf.read_header(v2_file)["linears"])
    assert len(names) == 14
    for name in names:
        a, b = new.linear_factory(name).quantized(), old.linear_factory(name).quantized()
        assert a.tensors().keys() == b.tensors().keys()
        for k, t in a.tensors().items():
            assert torch.equal(b.tensors()[k], t), (name, k)
        assert torch.equal(a.dequantize(), b.dequantize())


def test_format_1_file_with_a_bad_tensor_names_file_linear_and_tensor(v2_file, tmp_path):
    def bad(header, tensors):
        t = _to_v1(header, tensors)
        t["layers.1.mlp.up_proj.codes"] = t["layers.1.mlp.up_proj.codes"][:, :-1]
        return t

    v1_file = tmp_path / "bad.spqr"
    _rewrite(v2_file, v1_file, 1, bad)
    source = open_model(v1_file)
    with pytest.raises(
        ModelFormatError, match=r"bad\.spqr layers\.1\.mlp\.up_proj \(format 1\): format 1 tensor 'codes'"
    ):
        source.linear_factory("layers.1.mlp.up_proj")


@pytest.mark.parametrize(
    ("version", "message"), [(0, "format version 0 is no longer supported"), (3, "format version 3 is newer")]
)
def test_other_versions_are_refused(v2_file, tmp_path, version, message):
    path = tmp_path / "other.spqr"
    _rewrite(v2_file, path, version)
    with pytest.raises(ModelFormatError, match=rf"other\.spqr: {message}"):
        open_model(path)


def test_written_files_are_format_2(v2_file):
    assert sf.read_header(v2_file)["format_version"] == 2 == sf.FORMAT_VERSION
    with safe_open(v2_file, framework="pt") as f:
        names = set(f.keys())
    assert "layers.0.attn.q_proj.tiles" in names and "layers.0.attn.q_proj.outliers" in names
    assert not any(n.endswith((".codes", ".stats", ".second", ".outlier_values")) for n in names)
