"""Format 1 and 2 `.spqr` files load through exact converters to format 3 (spqr_run/quant/format_v1.py,
format_v2.py).

The old tensors are made here by small writers of the old layouts, independent of the converters' readers:
format 1 (16 x 16 tiles, row-major codes as one little-endian bit stream, stats = 16 scale then 16 zero codes)
and format 2 (3-bit codes as a 2-bit plane and a 1-bit plane, written from the format 2 spec).
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
from spqr_run.quant.format_v2 import convert_v2_tensors
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
    new = convert_v1_tensors(v1_tensors(q), q.meta, "t")
    assert set(new) == set(q.tensors())
    for name, t in q.tensors().items():
        assert torch.equal(new[name], t), name
    loaded = QuantizedLinear.from_tensors(new, meta=q.meta, source="t")
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
def current_file(tiny_model, tmp_path_factory) -> Path:  # noqa: F811
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


def test_format_1_file_loads_bit_identical_to_the_current_format(current_file, tmp_path):
    v1_file = tmp_path / "old.spqr"
    _rewrite(current_file, v1_file, 1, _to_v1)
    assert sf.read_header(v1_file)["format_version"] == 1
    with safe_open(v1_file, framework="pt") as f:
        assert any(n.endswith(".stats") for n in f.keys()) and not any(n.endswith(".tiles") for n in f.keys())
    new, old = open_model(current_file), open_model(v1_file)
    names = list(sf.read_header(current_file)["linears"])
    assert len(names) == 14
    for name in names:
        a, b = new.linear_factory(name).quantized(), old.linear_factory(name).quantized()
        assert a.tensors().keys() == b.tensors().keys()
        for k, t in a.tensors().items():
            assert torch.equal(b.tensors()[k], t), (name, k)
        assert torch.equal(a.dequantize(), b.dequantize())


def test_format_1_file_with_a_bad_tensor_names_file_linear_and_tensor(current_file, tmp_path):
    def bad(header, tensors):
        t = _to_v1(header, tensors)
        t["layers.1.mlp.up_proj.codes"] = t["layers.1.mlp.up_proj.codes"][:, :-1]
        return t

    v1_file = tmp_path / "bad.spqr"
    _rewrite(current_file, v1_file, 1, bad)
    source = open_model(v1_file)
    with pytest.raises(
        ModelFormatError, match=r"bad\.spqr layers\.1\.mlp\.up_proj \(format 1\): format 1 tensor 'codes'"
    ):
        source.linear_factory("layers.1.mlp.up_proj")


@pytest.mark.parametrize(
    ("version", "message"), [(0, "format version 0 is no longer supported"), (4, "format version 4 is newer")]
)
def test_other_versions_are_refused(current_file, tmp_path, version, message):
    path = tmp_path / "other.spqr"
    _rewrite(current_file, path, version)
    with pytest.raises(ModelFormatError, match=rf"other\.spqr: {message}"):
        open_model(path)


def test_written_files_are_format_3(current_file):
    assert sf.read_header(current_file)["format_version"] == 3 == sf.FORMAT_VERSION
    with safe_open(current_file, framework="pt") as f:
        names = set(f.keys())
    assert "layers.0.attn.q_proj.tiles" in names and "layers.0.attn.q_proj.outliers" in names
    assert not any(n.endswith((".codes", ".stats", ".second", ".outlier_values")) for n in names)


# ---- format 2 ------------------------------------------------------------------------------------------------
def v2_tiles(q: QuantizedLinear) -> torch.Tensor:
    """The format 2 tiles of an spqr linear: format 3's, with 3-bit codes re-written in format 2's planes (the
    old writer, from the format 2 spec: bits 0-1 of tile j's a{k} .x code at bit 2*(4*(j mod 2) + k) of lane
    word 2L + j // 2, bit 2 at bit 8*(j mod 2) + 4*(k // 2) + 2*(1 - j // 2) + (k mod 2) of word 64 + L; .y
    codes 16 bits up)."""
    m = q.meta
    tiles = q.tiles.clone()
    if m.wbits != 3:
        return tiles
    rt, kb = tiles.shape[:2]
    codes = torch.nn.functional.pad(
        q.unpack().codes.long(), (0, 64 * kb - m.in_features, 0, 16 * rt - m.out_features)
    )
    block = codes.reshape(rt, 16, kb, 64).transpose(1, 2)  # (RT, KB, 16, 64)
    words = torch.zeros(rt, kb, 96, dtype=torch.int64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for j in range(4):
            for k in range(4):
                high_bit = 8 * (j % 2) + 4 * (k // 2) + 2 * (1 - j // 2) + k % 2
                for c in (0, 1):
                    code = block[:, :, g + 8 * (k % 2), 16 * j + 2 * t + 8 * (k // 2) + c]
                    words[..., 2 * lane + j // 2] |= (code & 3) << (2 * (4 * (j % 2) + k) + 16 * c)
                    words[..., 64 + lane] |= (code >> 2) << (high_bit + 16 * c)
    tiles[..., :96] = torch.where(words > 0x7FFFFFFF, words - (1 << 32), words).to(torch.int32)
    return tiles


@pytest.mark.parametrize("wbits", [2, 3, 4])
@pytest.mark.parametrize(("out", "inp"), [(37, 150), (16, 64)])
def test_format_2_converter_is_exact(wbits, out, inp):
    q = QuantizedLinear.pack(random_unpacked("spqr", out, inp, wbits, 16, nnz=10, seed=wbits + out))
    old = {**q.tensors(), "tiles": v2_tiles(q)}
    assert torch.equal(old["tiles"], q.tiles) == (wbits != 3)  # only 3-bit records changed
    new = convert_v2_tensors(old, q.meta)
    for name, t in q.tensors().items():
        assert torch.equal(new[name], t), name


def test_format_2_converter_passes_bad_tiles_on_to_the_checks():
    q = QuantizedLinear.pack(random_unpacked("spqr", 20, 64, 3, 16, nnz=4, seed=1))
    bad = {**q.tensors(), "tiles": q.tiles[..., :-1]}
    with pytest.raises(ModelFormatError, match="f.spqr x.*tiles"):
        QuantizedLinear.from_tensors(convert_v2_tensors(bad, q.meta), meta=q.meta, source="f.spqr x")


def test_format_2_file_loads_bit_identical_to_the_current_format(current_file, tmp_path):
    def to_v2(header, tensors):
        from spqr_run.quant import LinearMeta

        for name, meta in header["linears"].items():
            parts = {k: tensors[f"{name}.{k}"] for k in ("tiles", "outliers", "outlier_row_ptr", "perm")
                     if f"{name}.{k}" in tensors}  # fmt: skip
            q = QuantizedLinear.from_tensors(parts, meta=LinearMeta.from_dict(meta), source=name)
            tensors[f"{name}.tiles"] = v2_tiles(q)
        return tensors

    old_file = tmp_path / "v2.spqr"
    _rewrite(current_file, old_file, 2, to_v2)
    assert sf.read_header(old_file)["format_version"] == 2
    new, old = open_model(current_file), open_model(old_file)
    names = list(sf.read_header(current_file)["linears"])
    with safe_open(old_file, framework="pt") as f:
        assert not torch.equal(
            f.get_tensor(f"{names[0]}.tiles"), new.linear_factory(names[0]).quantized().tiles
        )
    for name in names:
        a, b = new.linear_factory(name).quantized(), old.linear_factory(name).quantized()
        for k, t in a.tensors().items():
            assert torch.equal(b.tensors()[k], t), (name, k)
