"""The block-by-block quantization pipeline and the `.spqr` container, on a tiny random LLaMA with a real
(trained-in-test) byte-level BPE tokenizer."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from spqr_run.calibration import sample_from_model, windows_from_text
from spqr_run.errors import ConfigError, ModelFormatError
from spqr_run.loading import build_decoder, open_model
from spqr_run.loading.spqr_file import FORMAT_VERSION, read_header, write_spqr
from spqr_run.models.spqr_linear import SpQRLinear
from spqr_run.quant import QuantConfig
from spqr_run.quantize_model import quantize_model
from tests.conftest import WIKI_CALIB
from tests.tiny_configs import write_tiny_hf_llama

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

QCFG = QuantConfig(
    method="spqr", wbits=3, groupsize=16, stat_bits=3, stat_groupsize=16, outlier_threshold=0.2
)
CORPUS = (
    "The river flows past the old mill and into the valley, where farmers grow wheat and barley. "
    "In spring the water rises; in autumn it falls again, and the mill wheel turns more slowly. "
) * 40


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer LLaMA (hidden 64, GQA) with a 300-token byte-level BPE tokenizer, as an HF folder."""
    return write_tiny_hf_llama(tmp_path_factory.mktemp("tiny-llama"), CORPUS)


def _calib(source, n=4, seqlen=32):
    return windows_from_text(source.path / "calib.txt", source, nsamples=n, seqlen=seqlen)


def _quantize(folder: Path, out: Path, qcfg=QCFG, **kw):
    source = open_model(folder)
    return quantize_model(
        source,
        out,
        qcfg=qcfg,
        calib_tokens=_calib(source),
        calib_desc="calib.txt",
        device=torch.device("cpu"),
        **kw,
    )


def test_file_roundtrip_equals_in_memory_result(tiny_model, tmp_path, monkeypatch):
    import spqr_run.quantize_model as qm

    captured = []
    real = qm.quantize_linears
    monkeypatch.setattr(
        qm,
        "quantize_linears",
        lambda ws, h, *, config: captured.extend(real(ws, h, config=config)) or captured[-len(ws) :],
    )
    out = tmp_path / "tiny.spqr"
    summary = _quantize(tiny_model, out)
    assert (
        out.exists()
        and not (tmp_path / "tiny.spqr.tmp").exists()
        and not (tmp_path / "tiny.spqr.partial").exists()
    )
    source = open_model(out)
    names = [r.name for r in summary.layers]
    assert len(names) == len(captured) == 2 * 7
    for name, result in zip(names, captured, strict=True):
        module = source.linear_factory(name)
        assert isinstance(module, SpQRLinear)
        assert torch.equal(module.quantized().dequantize(), result.reconstruction)


def test_avg_bits_match_the_bytes_in_the_file(tiny_model, tmp_path):
    out = tmp_path / "bits.spqr"
    summary = _quantize(tiny_model, out)
    header = read_header(out)
    qbytes, overhead_bits, nnz = 0, 0, 0
    with safe_open(out, framework="pt") as f:
        for name in f.keys():
            module, _, field = name.rpartition(".")
            if module in header["linears"] and field != "bias":
                t = f.get_tensor(name)
                qbytes += t.numel() * t.element_size()
                if field in ("outlier_row_ptr", "perm"):  # index overhead outside the paper's formula
                    overhead_bits += t.numel() * t.element_size() * 8
                if field == "outliers":
                    nnz += t.numel()
    params = sum(m["out_features"] * m["in_features"] for m in header["linears"].values())
    assert summary.avg_bits == pytest.approx(qbytes * 8 / params, rel=1e-12)
    assert summary.file_bytes == out.stat().st_size
    assert summary.outlier_fraction == pytest.approx(nnz / params, rel=1e-12)
    # the paper's formula: wbits + (sbits + zbits)/beta1 + 2*(16+16)/(beta1*beta2) + 32 * outlier_fraction,
    # over the stored (padded) weights: records of 16 rows x 64 columns (in = 96 is stored as 128), plus the
    # stored row pointers and permutation
    padded = sum(
        -(-m["out_features"] // 16) * 16 * -(-m["in_features"] // 64) * 64 for m in header["linears"].values()
    )
    assert padded > params  # the down projections (in = 96) carry record padding
    formula_bits = padded * (3 + (3 + 3) / 16 + 2 * (16 + 16) / (16 * 16)) + 32 * nnz
    assert qbytes * 8 == formula_bits + overhead_bits


def test_quantized_model_runs_and_tracks_the_original(tiny_model, tmp_path):
    out = tmp_path / "run.spqr"
    _quantize(tiny_model, out, qcfg=QuantConfig(method="spqr", wbits=4, outlier_threshold=0.2))
    ref = build_decoder(open_model(tiny_model))
    quant = build_decoder(open_model(out))
    tokens = torch.randint(0, ref.config.vocab_size, (1, 24))
    with torch.no_grad():
        a, b = ref(tokens, use_cache=False), quant(tokens, use_cache=False)
    assert (a - b).abs().max() / a.abs().max() < 0.25
    assert (a - b).abs().max() > 0  # it really is quantized


@pytest.mark.parametrize("method,wbits,groupsize", [("gptq", 4, 32), ("rtn", 3, 32)])
def test_baselines_through_the_same_pipeline(tiny_model, tmp_path, method, wbits, groupsize):
    out = tmp_path / f"{method}.spqr"
    summary = _quantize(tiny_model, out, qcfg=QuantConfig(method=method, wbits=wbits, groupsize=groupsize))
    assert summary.outlier_fraction == 0 and summary.method == method
    assert build_decoder(open_model(out)) is not None


def test_resume_after_interruption_gives_the_same_file(tiny_model, tmp_path, monkeypatch):
    import spqr_run.quantize_model as qm

    full = tmp_path / "full.spqr"
    _quantize(tiny_model, full)
    out = tmp_path / "resumed.spqr"
    real, calls = qm.quantize_linears, []

    def flaky(ws, h, *, config):
        calls.append(1)
        if len(calls) == 6:  # in the second block (4 sequential groups per block)
            raise KeyboardInterrupt
        return real(ws, h, config=config)

    monkeypatch.setattr(qm, "quantize_linears", flaky)
    with pytest.raises(KeyboardInterrupt):
        _quantize(tiny_model, out)
    assert not out.exists() and (tmp_path / "resumed.spqr.partial").is_dir()
    with pytest.raises(ConfigError, match="pass --resume"):
        _quantize(tiny_model, out)
    monkeypatch.setattr(qm, "quantize_linears", real)
    _quantize(tiny_model, out, resume=True)
    assert not (tmp_path / "resumed.spqr.partial").exists()
    with safe_open(full, framework="pt") as a, safe_open(out, framework="pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_resume_with_other_settings_is_refused(tiny_model, tmp_path, monkeypatch):
    import spqr_run.quantize_model as qm

    out = tmp_path / "x.spqr"
    monkeypatch.setattr(qm, "quantize_linears", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _quantize(tiny_model, out)
    with pytest.raises(ConfigError, match="made with other settings"):
        _quantize(tiny_model, out, qcfg=QuantConfig(method="spqr", wbits=4), resume=True)
    monkeypatch.setattr(
        qm, "FORMAT_VERSION", qm.FORMAT_VERSION + 1
    )  # blocks packed by another format version
    with pytest.raises(ConfigError, match="made with other settings"):
        _quantize(tiny_model, out, resume=True)


def _same_files(a: Path, b: Path) -> None:
    with safe_open(a, framework="pt") as fa, safe_open(b, framework="pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k


class _Interrupt:
    """quantize_linears that raises KeyboardInterrupt (Ctrl-C) on its `at`-th call (4 calls per block)."""

    def __init__(self, monkeypatch, at: int) -> None:
        import spqr_run.quantize_model as qm

        self.real, self.calls, self.at = qm.quantize_linears, 0, at
        monkeypatch.setattr(qm, "quantize_linears", self)

    def __call__(self, ws, h, *, config):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(ws, h, config=config)


class _Calibration:
    """A calibration maker that counts its calls; `tokens` are what it returns."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens, self.calls = tokens, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.tokens


@pytest.mark.parametrize("at", [2, 6], ids=["in-block-0", "in-block-1"])
def test_resume_checks_first_and_reuses_the_stored_calibration(tiny_model, tmp_path, monkeypatch, at):
    """Ctrl-C, then: a rerun without resume fails before making any calibration, naming --resume; the
    resumed run uses the calibration stored with the partial run (the maker is not called, and a maker
    that would give other tokens changes nothing) and writes the same file as an uninterrupted run."""
    import spqr_run.quantize_model as qm

    source = open_model(tiny_model)
    tokens = _calib(source)
    full = tmp_path / "full.spqr"
    _quantize(tiny_model, full)
    out = tmp_path / "resumed.spqr"
    first = _Calibration(tokens)
    interrupt = _Interrupt(monkeypatch, at)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(
            source, out, qcfg=QCFG, calib_tokens=first, calib_desc="calib.txt", device=torch.device("cpu")
        )
    assert first.calls == 1 and (tmp_path / "resumed.spqr.partial" / "calibration.safetensors").is_file()
    monkeypatch.setattr(qm, "quantize_linears", interrupt.real)
    other = _Calibration(torch.randint_like(tokens, 0, 250))  # would change the result if it were used
    with pytest.raises(ConfigError, match="pass --resume"):
        quantize_model(
            source, out, qcfg=QCFG, calib_tokens=other, calib_desc="calib.txt", device=torch.device("cpu")
        )
    assert other.calls == 0
    summary = quantize_model(
        source,
        out,
        qcfg=QCFG,
        calib_tokens=other,
        calib_desc="calib.txt",
        device=torch.device("cpu"),
        resume=True,
    )
    assert other.calls == 0 and summary.calibration_seconds == 0
    assert not (tmp_path / "resumed.spqr.partial").exists()
    _same_files(full, out)


def test_summary_time_includes_the_calibration(tiny_model, tmp_path, monkeypatch):
    """The summary's time counts making the calibration (here a fake clock advanced by 100 s inside it)."""
    import spqr_run.quantize_model as qm

    clock = [1000.0]
    real = qm.time.perf_counter

    class FakeTime:
        @staticmethod
        def perf_counter() -> float:
            return clock[0] + real()

    monkeypatch.setattr(qm, "time", FakeTime)
    source = open_model(tiny_model)
    tokens = _calib(source)

    def slow_calibration() -> torch.Tensor:
        clock[0] += 100.0
        return tokens

    s = quantize_model(
        source,
        tmp_path / "t.spqr",
        qcfg=QCFG,
        calib_tokens=slow_calibration,
        calib_desc="c",
        device=torch.device("cpu"),
    )
    assert 100.0 <= s.calibration_seconds < 100.0 + s.quantization_seconds
    assert s.seconds == pytest.approx(s.calibration_seconds + s.quantization_seconds)
    assert s.seconds >= 100.0 and 0 < s.quantization_seconds < 100.0


def test_cli_resume_never_samples_twice(tiny_model, tmp_path, monkeypatch, capsys):
    """spqr-quantize with text sampled from the model: after Ctrl-C, the rerun stops at once with a message
    naming --resume (no sampling), and --resume continues without sampling, giving the uninterrupted file."""
    import spqr_run.cli.quantize as cli

    samples = []
    real_sample = cli.sample_from_model

    def counting_sample(*a, **k):
        samples.append(1)
        return real_sample(*a, **k)

    monkeypatch.setattr(cli, "sample_from_model", counting_sample)
    common = ["--nsamples", "4", "--seqlen", "24", "--device", "cpu", "--preset", "3bit"]
    full = tmp_path / "full.spqr"
    assert cli._main([str(tiny_model), "-o", str(full), *common]) == 0
    assert len(samples) == 1
    out = tmp_path / "out.spqr"
    interrupt = _Interrupt(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        cli._main([str(tiny_model), "-o", str(out), *common])
    assert len(samples) == 2
    monkeypatch.setattr(cli, "open_model", lambda *a: pytest.fail("the model was loaded before the check"))
    with pytest.raises(ConfigError, match="interrupted run: pass --resume"):
        cli._main([str(tiny_model), "-o", str(out), *common])
    assert len(samples) == 2
    monkeypatch.undo()
    monkeypatch.setattr(cli, "sample_from_model", counting_sample)
    monkeypatch.setenv("COLUMNS", "200")  # the summary table on one line per row
    capsys.readouterr()
    assert cli._main([str(tiny_model), "-o", str(out), *common, "--resume"]) == 0
    assert len(samples) == 2 and interrupt.calls == 6
    assert "calibration reused from the interrupted run" in capsys.readouterr().out
    _same_files(full, out)


def test_cli_summary_shows_calibration_time(tiny_model, tmp_path, capsys, monkeypatch):
    import spqr_run.cli.quantize as cli

    monkeypatch.setenv("COLUMNS", "200")  # the summary table on one line per row
    out = tmp_path / "o.spqr"
    assert (
        cli._main([str(tiny_model), "-o", str(out), "--nsamples", "2", "--seqlen", "16", "--device", "cpu"])
        == 0
    )
    text = capsys.readouterr().out
    assert "calibration" in text and "quantization" in text
    row = next(line for line in text.splitlines() if "time" in line and "calibration" in line)
    assert "reused" not in row


def test_progress_bars_show_an_eta():
    from rich.console import Console
    from rich.progress import TimeRemainingColumn

    from spqr_run.cli.chat import _progress
    from spqr_run.cli.quantize import progress_columns

    assert any(isinstance(c, TimeRemainingColumn) for c in progress_columns())
    assert any(isinstance(c, TimeRemainingColumn) for c in _progress(Console(force_terminal=True)).columns)


def test_one_hessian_per_group_equals_each_linears_own(tiny_model):
    """collect_hessian stops the forward at the group's first linear; its H equals what a full forward
    gives at the input of every linear of the group (they all read the same input)."""
    import spqr_run.quantize_model as qm
    from spqr_run.models.decoder import Rotary

    source = open_model(tiny_model)
    cfg = source.config
    dev = torch.device("cpu")
    rotary = Rotary(cfg)
    inps = source.weights["embed_tokens.weight"][_calib(source)].float()
    block = qm.load_block(source, 0, dev)
    sums, counts = {}, {}

    def hook(name):
        def fn(_m, args, _o):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return fn

    names = [n for g in qm.sequential_groups(cfg) for n in g]
    handles = [block.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    qm.run_block(block, rotary, inps, dev)
    for h in handles:
        h.remove()
    reuse = qm._PassCache()  # later passes replayed from what earlier ones recorded: the same numbers
    for group in qm.sequential_groups(cfg):
        got = qm.collect_hessian(block, group[0], rotary, inps, dev)
        replayed = qm.collect_hessian(block, group[0], rotary, inps, dev, reuse)
        for name in group:
            want = (sums[name] * (2.0 / counts[name])).float()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(replayed, want, rtol=1e-4, atol=1e-5)
    assert reuse.o_inputs and reuse.mlp_inputs


def test_default_model_preparation_resumes_without_sampling_again(tiny_model, tmp_path, monkeypatch):
    """spqr-chat's first run interrupted while quantizing: the next run continues it with the calibration
    it sampled (sampling is not run again) and prepares the same file as an uninterrupted run."""
    import spqr_run.calibration as calibration
    import spqr_run.default_model as dm

    monkeypatch.setattr(dm, "DEFAULT_CALIBRATION", (3, 20))
    samples = []
    real_sample = calibration.sample_from_model
    monkeypatch.setattr(
        calibration, "sample_from_model", lambda *a, **k: samples.append(1) or real_sample(*a, **k)
    )
    full = dm.finish_default_model(tiny_model, models_dir=tmp_path / "once")
    assert len(samples) == 1
    assert read_header(full)["model_config"]["name"] == "SmolLM2-135M-Instruct"  # the demo's name, issue 23
    interrupt = _Interrupt(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        dm.finish_default_model(tiny_model, models_dir=tmp_path / "twice")
    assert len(samples) == 2
    monkeypatch.setattr("spqr_run.quantize_model.quantize_linears", interrupt.real)
    path = dm.finish_default_model(tiny_model, models_dir=tmp_path / "twice")
    assert len(samples) == 2
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # the partial run is gone
    _same_files(full, path)


def test_calibration_too_short(tiny_model):
    source = open_model(tiny_model)
    with pytest.raises(
        ConfigError, match=r"calib\.txt: has \d+ tokens, too short for --nsamples 1000 x --seqlen 128"
    ):
        windows_from_text(tiny_model / "calib.txt", source, nsamples=1000, seqlen=128)


def test_sampled_calibration_is_reproducible(tiny_model):
    source = open_model(tiny_model)
    a = sample_from_model(source, nsamples=3, seqlen=10, device=torch.device("cpu"), seed=1)
    b = sample_from_model(source, nsamples=3, seqlen=10, device=torch.device("cpu"), seed=1)
    assert a.shape == (3, 10) and torch.equal(a, b) and (a[:, 0] == 0).all()


# ---- bad files --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "good.spqr"
    _quantize(tiny_model, out)
    return out


def test_corrupt_file(tmp_path):
    bad = tmp_path / "corrupt.spqr"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(ModelFormatError, match=r"corrupt\.spqr: corrupt or truncated \.spqr file"):
        open_model(bad)


def test_truncated_file(good_file, tmp_path):
    bad = tmp_path / "truncated.spqr"
    bad.write_bytes(good_file.read_bytes()[: good_file.stat().st_size * 2 // 3])
    with pytest.raises(ModelFormatError, match=r"truncated\.spqr: corrupt or truncated"):
        open_model(bad)


def _rewrite_header(src: Path, dst: Path, change) -> None:
    with safe_open(src, framework="pt") as f:
        header = json.loads(f.metadata()["spqr"])
        names = list(f.keys())
    header = change(header)
    header.pop("format", None)
    version = header.pop("format_version")

    def loader(n):
        def load():
            with safe_open(src, framework="pt") as f:
                return f.get_tensor(n)

        return load

    import spqr_run.loading.spqr_file as sf

    old = sf.FORMAT_VERSION
    sf.FORMAT_VERSION = version
    try:
        write_spqr(dst, header, [(n, loader(n)) for n in names])
    finally:
        sf.FORMAT_VERSION = old


def test_future_format_version(good_file, tmp_path):
    bad = tmp_path / "future.spqr"
    _rewrite_header(good_file, bad, lambda h: {**h, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(
        ModelFormatError,
        match=rf"future\.spqr: format version {FORMAT_VERSION + 1} is newer than this spqr-run reads",
    ):
        open_model(bad)


def test_tampered_shape_in_header(good_file, tmp_path):
    bad = tmp_path / "tampered.spqr"

    def change(h):
        h["linears"]["layers.0.attn.q_proj"]["out_features"] = 48
        return h

    _rewrite_header(good_file, bad, change)
    with pytest.raises(
        ModelFormatError, match=r"linear 'layers\.0\.attn\.q_proj' is 48x64, config implies 64x64"
    ):
        open_model(bad)


def test_foreign_safetensors_renamed(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "foreign.spqr"
    save_file({"x": torch.zeros(3)}, str(bad))
    with pytest.raises(ModelFormatError, match=r"foreign\.spqr: not a \.spqr file"):
        open_model(bad)


def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "spqr_run.cli.quantize", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_json_summary_and_eval_accepts_spqr(tiny_model, tmp_path):
    out = tmp_path / "cli.spqr"
    r = _cli(
        tiny_model,
        "-o",
        out,
        "--preset",
        "3bit",
        "--calib",
        tiny_model / "calib.txt",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--device",
        "cpu",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("avg_bits", "outlier_fraction", "quantized_params", "seconds"):
        assert key in summary
    assert summary["quantized_params"] == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 96 * 64 * 3)
    e = subprocess.run(
        [sys.executable, "-m", "spqr_run.cli.eval", str(out), "--text", str(tiny_model / "calib.txt"), "--max-tokens", "200", "--seqlen", "64", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout.strip().splitlines()[-1])["ppl"] > 1


def test_cli_short_calibration_leaves_no_output(tiny_model, tmp_path):
    out = tmp_path / "short.spqr"
    r = _cli(
        tiny_model,
        "-o",
        out,
        "--calib",
        tiny_model / "calib.txt",
        "--nsamples",
        "500",
        "--seqlen",
        "128",
        "--device",
        "cpu",
    )
    assert r.returncode == 2 and "too short" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    r = _cli(tmp_path, "-o", tmp_path / "o.spqr", "--calib", WIKI_CALIB)
    assert r.returncode == 2 and "unsupported architecture 'gpt_neox'" in r.stderr
    assert not (tmp_path / "o.spqr").exists()


def test_fp_target_weight_is_the_least_squares_fit_to_the_full_precision_outputs():
    from spqr_run.quantize_model import fp_target_weight

    torch.manual_seed(0)
    w = torch.randn(12, 20)
    x_q = torch.randn(500, 20, dtype=torch.float64)  # (tokens, in) inputs of the quantized model
    x_fp = x_q + 0.1 * torch.randn(500, 20, dtype=torch.float64)  # the full-precision model's
    h = (2 / 500 * x_q.T @ x_q).float()
    d = (2 / 500 * (x_fp - x_q).T @ x_q).float()
    w_star = fp_target_weight(w, h, d, percdamp=0.0)
    # argmin_V ||X_fp W^T - X_q V^T||, solved directly
    ref = torch.linalg.lstsq(x_q, x_fp @ w.double().T).solution.T
    torch.testing.assert_close(w_star.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(fp_target_weight(w, h, torch.zeros_like(d), percdamp=0.01), w)  # same inputs: W


def test_fp_targets_through_the_pipeline_and_resume(tiny_model, tmp_path, monkeypatch):
    import spqr_run.quantize_model as qm

    qcfg = QuantConfig(method="spqr", wbits=3, outlier_threshold=0.2, fp_targets=True)
    full = tmp_path / "full.spqr"
    summary = _quantize(tiny_model, full, qcfg=qcfg)
    plain = _quantize(tiny_model, tmp_path / "plain.spqr")
    # block 0's first group sees the same inputs in both models: identical; later ones differ
    assert summary.layers[0].relative_error == plain.layers[0].relative_error
    assert summary.layers[-1].relative_error != plain.layers[-1].relative_error
    out = tmp_path / "resumed.spqr"
    real, calls = qm.quantize_linears, []

    def flaky(ws, h, *, config):
        calls.append(1)
        if len(calls) == 6:  # in the second block
            raise KeyboardInterrupt
        return real(ws, h, config=config)

    monkeypatch.setattr(qm, "quantize_linears", flaky)
    with pytest.raises(KeyboardInterrupt):
        _quantize(tiny_model, out, qcfg=qcfg)
    monkeypatch.setattr(qm, "quantize_linears", real)
    _quantize(tiny_model, out, qcfg=qcfg, resume=True)
    _same_files(full, out)


def test_presets_search_the_stat_codes_and_a_flag_turns_it_off():
    from spqr_run.cli.quantize import build_parser, quant_config_from_args
    from spqr_run.quantize_model import PRESETS

    assert all(p.stat_search and not p.fp_targets for p in PRESETS.values())
    for preset in PRESETS:
        base = ["m.gguf", "-o", "x.spqr", "--preset", preset]
        assert quant_config_from_args(build_parser().parse_args(base)).stat_search
        off = quant_config_from_args(build_parser().parse_args([*base, "--no-stat-search"]))
        assert off == dataclasses.replace(PRESETS[preset], stat_search=False)
    gptq = quant_config_from_args(build_parser().parse_args(["m", "-o", "x", "--method", "gptq"]))
    assert not gptq.stat_search  # the baselines stay the paper's


# ---- a full disk (issue 23 item 3): one line, what was kept, the --resume command; nothing lost ------------
ENOSPC_MESSAGE = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)


def _check_disk_full_line(message: str, writing: str) -> None:
    assert "\n" not in message
    assert message.startswith("no space left on the disk: writing ") and writing in message
    assert "needed" in message and "free there" in message and "kept" in message


def test_disk_full_while_saving_a_block_keeps_the_finished_ones(tiny_model, tmp_path, monkeypatch):
    """safetensors' ENOSPC (a SafetensorError, as on a real full disk) while block 1 is saved: the error says
    what failed and what was kept, no temporary file is left, and --resume gives the uninterrupted file."""
    import safetensors

    import spqr_run.quantize_model as qm
    from spqr_run.errors import DiskFullError

    full = tmp_path / "full.spqr"
    _quantize(tiny_model, full)
    out = tmp_path / "out.spqr"
    real_save = qm.save_file

    def full_disk(tensors, filename, metadata=None):
        if "block_0001" in str(filename):
            Path(filename).write_bytes(b"\0" * 100)  # what a write cut short leaves
            raise safetensors.SafetensorError(ENOSPC_MESSAGE)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(qm, "save_file", full_disk)
    with pytest.raises(DiskFullError) as e:
        _quantize(tiny_model, out)
    message = str(e.value)
    _check_disk_full_line(message, "block_0001.safetensors")
    assert "1 of 2 blocks" in message and "--resume" in message
    partial = tmp_path / "out.spqr.partial"
    assert not out.exists() and partial.is_dir() and not list(partial.glob("*.tmp"))
    monkeypatch.setattr(qm, "save_file", real_save)
    _quantize(tiny_model, out, resume=True)
    _same_files(full, out)


@pytest.mark.skipif(
    not Path("/dev/full").exists(), reason="needs /dev/full (a device whose writes fail ENOSPC)"
)
def test_cli_disk_full_on_the_final_write_prints_one_line_with_the_resume_command(
    tiny_model, tmp_path, capsys
):
    """The kernel's own ENOSPC on the final write (the temporary file is /dev/full): exit 2, one line naming
    the file, the bytes needed, what was kept and the exact command that continues; that command works."""
    import shlex

    import spqr_run.cli.quantize as cli

    out = tmp_path / "o.spqr"
    (tmp_path / "o.spqr.tmp").symlink_to("/dev/full")
    args = [str(tiny_model), "-o", str(out), "--nsamples", "2", "--seqlen", "16", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    message = lines[0].removeprefix("error: ")
    _check_disk_full_line(message, str(out))
    assert "all 2 blocks" in message and not out.exists() and (tmp_path / "o.spqr.partial").is_dir()
    command = message.rpartition("continue with: ")[2]
    argv = shlex.split(command)
    assert argv[0] == "spqr-quantize" and argv[-1] == "--resume"
    assert cli._main(argv[1:]) == 0
    assert out.exists() and not (tmp_path / "o.spqr.partial").exists()
    assert open_model(out).kind == "spqr"


def test_free_space_is_checked_before_the_final_write(tiny_model, tmp_path, monkeypatch):
    import shutil

    from spqr_run.errors import DiskFullError

    out = tmp_path / "small.spqr"
    real = shutil.disk_usage

    def almost_full(path):
        usage = real(path)
        return usage._replace(free=4096) if Path(path) == tmp_path else usage

    monkeypatch.setattr(shutil, "disk_usage", almost_full)
    with pytest.raises(DiskFullError) as e:
        _quantize(tiny_model, out)
    message = str(e.value)
    _check_disk_full_line(message, str(out))
    assert "4.0 KiB free there" in message and "all 2 blocks" in message
    assert not (tmp_path / "small.spqr.tmp").exists() and not out.exists()


def test_blocks_and_dense_models_read_each_weight_once_and_name_bad_ones(tiny_model):
    """`load_block` and the fine-tuning's `dense_decoder` read every tensor of the lazy source once (a
    membership test first would dequantize a GGUF tensor twice) and name a missing or misshapen one."""
    from collections.abc import Mapping

    import spqr_run.quantize_model as qm
    from spqr_run.finetune import dense_decoder

    source = open_model(tiny_model)
    reads: list[str] = []

    class Counting(Mapping):
        def __init__(self, weights, changed=None):
            self.weights, self.changed = weights, changed or {}

        def __getitem__(self, name):
            reads.append(name)
            if name in self.changed:
                if self.changed[name] is None:
                    raise KeyError(name)
                return self.changed[name]
            return source.weights[name]

        def __iter__(self):
            return iter(self.weights)

        def __len__(self):
            return len(self.weights)

    dev = torch.device("cpu")
    counted = dataclasses.replace(source, weights=Counting(source.weights))
    block = qm.load_block(counted, 1, dev)
    assert sorted(reads) == sorted(f"layers.1.{n}" for n, _ in block.named_parameters())
    assert torch.equal(block.mlp.down_proj.weight, source.weights["layers.1.mlp.down_proj.weight"].float())
    reads.clear()
    model = dense_decoder(source.config, Counting(source.weights), dev)
    assert sorted(reads) == sorted(n for n, _ in model.named_parameters())

    bad = dataclasses.replace(
        source, weights=Counting(source.weights, {"layers.1.attn.o_proj.weight": torch.zeros(3, 3)})
    )
    with pytest.raises(
        ConfigError, match=r"weight layers\.1\.attn\.o_proj\.weight has shape \(3, 3\), expected"
    ):
        qm.load_block(bad, 1, dev)
    gone = Counting(source.weights, {"norm.weight": None})
    with pytest.raises(ValueError, match=r"weight norm\.weight is missing"):
        dense_decoder(source.config, gone, dev)
