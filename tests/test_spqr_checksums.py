"""Per-tensor checksums in the `.spqr` header (issue 23 item 4): written with every tensor, verified when a
tensor is read, a flipped byte refused with one line naming the tensor, skippable, and older files without
checksums still load."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from spqr_run.errors import ModelFormatError
from spqr_run.loading import build_decoder, open_model
from spqr_run.loading.spqr_file import read_header
from spqr_run.quant import QuantConfig
from spqr_run.quantize_model import quantize_model
from tests.test_quantize_model import CORPUS, _calib
from tests.tiny_configs import write_tiny_hf_llama

pytest.importorskip("transformers")

QCFG = QuantConfig(
    method="spqr", wbits=3, groupsize=16, stat_bits=3, stat_groupsize=16, outlier_threshold=0.2
)


@pytest.fixture(scope="module")
def spqr_file(tmp_path_factory) -> Path:
    folder = write_tiny_hf_llama(tmp_path_factory.mktemp("tiny-llama"), CORPUS)
    out = tmp_path_factory.mktemp("spqr") / "tiny.spqr"
    source = open_model(folder)
    quantize_model(
        source,
        out,
        qcfg=QCFG,
        calib_tokens=_calib(source),
        calib_desc="calib.txt",
        device=torch.device("cpu"),
    )
    return out


def _index(path: Path) -> tuple[int, dict]:
    """(start of the data section, the safetensors JSON index) of a file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def _flip_byte(src: Path, dst: Path, tensor: str, at: float = 0.0) -> None:
    """Copy `src` to `dst` with one byte inside `tensor`'s data inverted (by default its first: packed codes,
    or the low byte of an fp16, so the file stays loadable when the check is skipped)."""
    start, index = _index(src)
    begin, end = index[tensor]["data_offsets"]
    raw = bytearray(src.read_bytes())
    pos = start + begin + int((end - begin - 1) * at)
    raw[pos] ^= 0xFF
    dst.write_bytes(bytes(raw))


def test_every_tensor_has_its_crc32_in_the_header(spqr_file: Path) -> None:
    header = read_header(spqr_file)
    sums = header["checksums"]
    assert sums["algorithm"] == "crc32"
    with safe_open(spqr_file, framework="pt") as f:
        names = list(f.keys())
        assert sorted(sums["tensors"]) == sorted(names)
        for name in names:
            t = f.get_tensor(name).contiguous()
            assert sums["tensors"][name] == f"{zlib.crc32(t.view(torch.uint8).numpy()):08x}"
    assert header["format_version"] == 3  # an optional field: no new format version


@pytest.mark.parametrize("tensor", ["layers.1.mlp.down_proj.tiles", "embed_tokens.weight", "norm.weight"])
def test_a_flipped_byte_is_refused_naming_the_tensor(spqr_file: Path, tmp_path: Path, tensor: str) -> None:
    bad = tmp_path / "bad.spqr"
    _flip_byte(spqr_file, bad, tensor)
    with pytest.raises(ModelFormatError) as e:
        build_decoder(open_model(bad))
    message = str(e.value)
    assert "\n" not in message and f"bad.spqr: tensor {tensor!r} is corrupt" in message
    assert "--skip-checksums" in message
    build_decoder(open_model(bad, verify_checksums=False))  # skipping the check loads it as it is


def test_a_file_without_checksums_still_loads(spqr_file: Path, tmp_path: Path) -> None:
    """Files written before checksums existed have no `checksums` header field: they load unverified."""
    start, index = _index(spqr_file)
    header = json.loads(index["__metadata__"]["spqr"])
    del header["checksums"]
    index["__metadata__"]["spqr"] = json.dumps(header)
    blob = json.dumps(index, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    old = tmp_path / "old.spqr"
    old.write_bytes(struct.pack("<Q", len(blob)) + blob + spqr_file.read_bytes()[start:])
    assert "checksums" not in read_header(old)
    model = build_decoder(open_model(old))
    ref = build_decoder(open_model(spqr_file))
    tokens = torch.tensor([[1, 5, 9, 12]])
    assert torch.equal(model(tokens, use_cache=False), ref(tokens, use_cache=False))


def test_cli_refuses_a_corrupt_file_in_one_line_and_the_flag_skips_the_check(
    spqr_file: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.spqr"
    _flip_byte(spqr_file, bad, "layers.0.attn.q_proj.tiles")
    text = tmp_path / "t.txt"
    text.write_text(CORPUS)

    def run(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "spqr_run.cli.eval", str(bad), "--text", str(text), "--max-tokens", "64"]
        return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=300)

    r = run()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]  # after a progress line
    assert len(errors) == 1 and "tensor 'layers.0.attn.q_proj.tiles' is corrupt" in errors[0]
    r = run("--skip-checksums")
    assert r.returncode == 0, r.stderr
