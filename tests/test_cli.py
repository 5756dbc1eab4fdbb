"""What the commands share: numeric flags checked (one line, exit 2) before anything loads, text we did not
write printed literally (never as rich markup), the dependency check before any download, a --ctx above the
model's limit refused, and help text on every visible flag. Subprocesses where the process boundary matters
(exit status, no traceback)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GGUF, require_data

from spqr_run.chat.info import ModelFacts, describe
from spqr_run.cli import bench, chat, eval, run, serve
from spqr_run.cli.common import run_cli
from spqr_run.errors import SpqrError

REPO = Path(__file__).resolve().parents[1]
PARSERS = {
    "spqr-chat": chat.build_parser,
    "spqr-serve": serve.build_parser,
    "spqr-run": run.build_parser,
    "spqr-eval": eval.build_parser,
    "spqr-bench": bench.build_parser,
}


def cli(module: str, *args: str, stdin: str | None = "", env: dict | None = None, timeout: float = 300):
    """Run `python -m spqr_run.cli.MODULE ARGS` from the checkout; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", f"spqr_run.cli.{module}", *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def one_error_line(stderr: str) -> str:
    """The single 'error: ...' line of a refused command (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# ---- numeric flags ------------------------------------------------------------------------------------
BAD_FLAGS = [
    ("spqr-chat", ["--ctx", "-5"], "argument --ctx: invalid value -5: must be at least 16 tokens"),
    ("spqr-chat", ["--ctx", "lots"], "argument --ctx: expected a whole number, got 'lots'"),
    ("spqr-chat", ["--temperature", "-1"], "argument --temperature: invalid value -1.0: must be in [0, 100]"),
    ("spqr-chat", ["--temperature", "nan"], "argument --temperature: invalid value nan"),
    ("spqr-chat", ["--top-p", "0"], "argument --top-p: invalid value 0.0: must be in (0, 1]"),
    ("spqr-chat", ["--top-k", "-1"], "argument --top-k: invalid value -1: must be >= 0"),
    ("spqr-chat", ["--min-p", "1.5"], "argument --min-p: invalid value 1.5: must be in [0, 1]"),
    ("spqr-chat", ["--repeat-penalty", "0"], "argument --repeat-penalty: invalid value 0.0"),
    ("spqr-chat", ["--max-tokens", "0"], "argument --max-tokens: invalid value 0: must be at least 1"),
    ("spqr-chat", ["--seed", "-1"], "argument --seed: invalid value -1"),
    ("spqr-serve", ["m.spqr", "--parallel", "0"], "argument --parallel: invalid value 0: must be at least 1"),
    (
        "spqr-serve",
        ["m.spqr", "--port", "70000"],
        "argument --port: invalid value 70000: must be in [0, 65535]",
    ),
    ("spqr-serve", ["m.spqr", "--port", "-1"], "argument --port: invalid value -1"),
    ("spqr-serve", ["m.spqr", "--ctx", "8"], "argument --ctx: invalid value 8: must be at least 16 tokens"),
    ("spqr-serve", ["m.spqr", "--max-queue", "-1"], "argument --max-queue: invalid value -1"),
    ("spqr-run", ["generate", "m", "--prompt", "x", "--max-tokens", "0"], "argument --max-tokens: invalid"),
    ("spqr-run", ["generate", "m", "--prompt", "x", "--top-p", "2"], "argument --top-p: invalid value 2.0"),
    ("spqr-run", ["generate", "m", "--prompt", "x", "--ctx", "0"], "argument --ctx: invalid value 0"),
    ("spqr-eval", ["m", "--text", "t", "--seqlen", "1"], "argument --seqlen: invalid value 1"),
    ("spqr-eval", ["m", "--text", "t", "--max-tokens", "1"], "argument --max-tokens: invalid value 1"),
    ("spqr-bench", ["--prompt-len", "0"], "argument --prompt-len: invalid value 0: must be at least 1"),
    ("spqr-bench", ["--new-tokens", "-3"], "argument --new-tokens: invalid value -3"),
    ("spqr-bench", ["--batch", "0"], "argument --batch: invalid value 0"),
    ("spqr-bench", ["--repeats", "0"], "argument --repeats: invalid value 0"),
    ("spqr-bench", ["--outlier-rate", "2"], "argument --outlier-rate: invalid value 2: must be in [0, 1]"),
]


@pytest.mark.parametrize(("prog", "args", "message"), BAD_FLAGS)
def test_bad_numeric_flags_are_one_line_errors_at_parse_time(prog, args, message, capsys):
    """Refused while parsing the command line: before any model is opened (the model paths do not exist)."""
    with pytest.raises(SystemExit) as e:
        PARSERS[prog]().parse_args(args)
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line and f"(see {prog}" in line, line


def test_bad_flag_through_the_real_command():
    proc = cli("chat", "--ctx", "-5")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--ctx: invalid value -5" in one_error_line(proc.stderr)


def test_every_visible_flag_has_help_text():
    def actions(parser: argparse.ArgumentParser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from actions(sub)
            elif action.help != argparse.SUPPRESS and action.dest != "help":
                yield parser.prog, action

    missing = [
        f"{prog} {action.option_strings or action.dest}"
        for build in PARSERS.values()
        for prog, action in actions(build())
        if not action.help
    ]
    assert missing == []
    assert "--log-level" in serve.build_parser().format_help()


def test_chat_min_p_and_repeat_penalty_flags_reach_the_sampler():
    args = chat.build_parser().parse_args(["--min-p", "0.05", "--repeat-penalty", "1.1", "--top-k", "40"])
    params = chat.sampling_params(args, {"temperature": 0.2, "min_p": 0.5})
    assert (params.min_p, params.repetition_penalty, params.top_k) == (0.05, 1.1, 40)
    assert params.temperature == 0.2  # the model's default where no flag is given
    args = run.build_parser().parse_args(["generate", "m", "--prompt", "x", "--min-p", "0.1"])
    assert args.min_p == 0.1 and args.repetition_penalty is None


def test_eval_example_uses_files_a_user_has():
    text = eval.build_parser().format_help()
    assert "shared" not in text and "--text README.md" in text


# ---- literal output -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "message",
    [
        "install it: pip install 'spqr-run[gguf]'",
        "/tmp/[bold]models[/bold]/x.gguf: no such file",
        "/tmp/a[/]b.gguf: no such file",
        "[red]not red[/red] \\[escaped]",
    ],
)
def test_errors_print_their_text_literally(message, capsys):
    def fail() -> int:
        raise SpqrError(message)

    with pytest.raises(SystemExit) as e:
        run_cli(fail)
    assert e.value.code == 2
    assert one_error_line(capsys.readouterr().err) == f"error: {message}"


def test_markup_closing_tag_in_a_model_path_is_a_one_line_error(tmp_path):
    """A path holding "[/]" used to crash rich's markup parser (MarkupError traceback, exit 1)."""
    missing = tmp_path / "x[/]y[bold].spqr"
    proc = cli("chat", str(missing), "--plain")
    assert proc.returncode == 2
    assert f"model '{missing}' not found" in one_error_line(proc.stderr)


def test_markup_in_a_model_file_name_through_loading_and_progress(tmp_path):
    """An existing (corrupt) file: its name goes through the loading progress bar and the error, literally."""
    (tmp_path / "d[").mkdir()
    bad = tmp_path / "d[" / "]a[bold]c.gguf"  # the path holds "[/]", the name "[bold]"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    proc = cli("chat", str(bad), "--plain", "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "MarkupError" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(bad) in errors[0], proc.stderr
    assert "d[/]a[bold]c.gguf" in errors[0] and "loading ]a[bold]c.gguf" in proc.stderr  # literally


def test_serve_load_failure_prints_the_file_name_literally(tmp_path):
    (tmp_path / "m[").mkdir()
    bad = tmp_path / "m[" / "]odel.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    proc = cli("serve", str(bad), "--port", "0", "--log-level", "error", "--device", "cpu", timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(bad) in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_banner_memory_plan_counts_the_workspace():
    mib = 2**20
    facts = ModelFacts(
        name="m",
        file="m.spqr",
        arch="llama",
        parameters=135_000_000,
        bits_per_param=4.6,
        bits_note="",
        device="cpu",
        weights_bytes=500 * mib,
        workspace_bytes=300 * mib,
        kv_cache_bytes=200 * mib,
        budget_bytes=8 * 1024 * mib,
        max_context=4096,
        context_fit=100_000,
        max_positions=8192,
        kv_dtype="fp32",
    )
    plan = dict(describe(facts))["memory plan"]
    assert plan.startswith("weights 500.0 MiB + workspace 300.0 MiB + KV cache 200.0 MiB (fp32) = 1000.0 MiB")


def test_banner_names_the_model_as_its_file_does(tmp_path):
    """Issue 23: the demo's banner said "Smollm2 135M 8k Lc100K Mix1 Ep2" (the GGUF's general.name) where the
    README and the file say SmolLM2-135M-Instruct: the banner names a model by its file (what the user typed),
    and adds the metadata's own name only when it is another name."""
    from spqr_run.chat.info import display_name

    demo = tmp_path / "SmolLM2-135M-Instruct.spqr"
    demo.write_bytes(b"")
    assert display_name(demo, "SmolLM2-135M-Instruct") == ("SmolLM2-135M-Instruct", "")
    assert display_name(demo, "smollm2 135m instruct") == ("SmolLM2-135M-Instruct", "")
    name, other = display_name(demo, "Smollm2 135M 8k Lc100K Mix1 Ep2")
    assert name == "SmolLM2-135M-Instruct" and other == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    folder = tmp_path / "Llama-2-7b-hf"
    folder.mkdir()
    assert display_name(folder, "meta-llama/Llama-2-7b-hf") == ("Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf")
    facts = dict(
        file=str(demo), arch="llama", parameters=1, bits_per_param=None, bits_note="", device="cpu",
        weights_bytes=1, workspace_bytes=1, kv_cache_bytes=1, budget_bytes=4, max_context=16, context_fit=16,
        max_positions=16, kv_dtype="fp32",
    )  # fmt: skip
    row = dict(describe(ModelFacts(name=name, metadata_name=other, **facts)))["model"]
    assert row == f'SmolLM2-135M-Instruct ({demo}; its metadata calls it "Smollm2 135M 8k Lc100K Mix1 Ep2")'
    assert dict(describe(ModelFacts(name=name, **facts)))["model"] == f"SmolLM2-135M-Instruct ({demo})"


# ---- dependencies and the context limit ---------------------------------------------------------------
def test_missing_dependency_is_reported_before_any_download(tmp_path):
    """gguf unimportable: spqr-chat (no model: the demo model) says so at once and prepares nothing."""
    models = tmp_path / "models"
    code = "import sys; sys.modules['gguf'] = None; sys.argv = ['spqr-chat', '--plain']\n"
    code += "from spqr_run.cli.chat import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        input="",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "SPQR_RUN_MODELS": str(models)},
    )
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "'gguf'" in line and "pip install gguf" in line and "pip install -e ." in line, line
    assert not models.exists()  # nothing downloaded, extracted or quantized


@pytest.mark.slow
def test_ctx_above_the_model_limit_is_refused():
    require_data()
    proc = cli("chat", str(GGUF), "--ctx", "99999999", "--plain", "--device", "cpu")
    assert proc.returncode == 2 and "max context" not in proc.stdout  # refused, not started clamped
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "invalid --ctx 99999999" in errors[0] and "at most 8192 tokens" in errors[0], errors[0]


def test_log_arguments_are_printed_literally():
    import io
    import logging

    from spqr_run.cli.common import LiteralLogArgs

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(LiteralLogArgs())
    logger = logging.getLogger("spqr_run.test_literal_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("model %s loaded: %d slots", "\x1b[2Jevil[/]\rname", 4)
    finally:
        logger.removeHandler(handler)
    assert buf.getvalue() == "model \\x1b[2Jevil[/]name loaded: 4 slots\n"


@pytest.mark.slow
def test_server_log_prints_a_model_name_literally(tmp_path):
    """The server's own log line names the model: control characters in --model-name are not sent raw."""
    from test_server_support import needs_model, start_server

    if needs_model.args[0]:
        pytest.skip(needs_model.kwargs["reason"])
    server = start_server("--model-name", "\x1b[31mevil", "--log-level", "info", "--ctx", "256", tmp=tmp_path)
    try:
        server.wait_ready(timeout=240)
    finally:
        server.stop()
    log = server.log.read_text(errors="replace")
    assert "model \\x1b[31mevil loaded" in log and "\x1b[31mevil" not in log, log[-2000:]


def test_quantize_summary_prints_paths_and_layer_names_literally() -> None:
    """spqr-quantize's summary shows the output path, layer names and calibration text as written: a `[/]`
    used to raise MarkupError after the whole quantization, `[bold]` vanished."""
    from io import StringIO

    from rich.console import Console

    from spqr_run.cli.quantize import print_summary
    from spqr_run.quant import QuantConfig
    from spqr_run.quantize_model import LayerReport, QuantizeSummary

    layer = LayerReport("blocks.0.[bold]q_proj", 16, 16, 4.6, 0.0, 0.01, 0.1)
    summary = QuantizeSummary(
        path="/tmp/a[/]b/[bold]x.spqr", method="spqr", avg_bits=4.6, file_bits_per_param=5.0,
        outlier_fraction=0.0, quantized_params=256, total_params=300, file_bytes=200,
        calibration="text [red]calib[/].txt", seconds=1.0, layers=[layer],
    )  # fmt: skip
    out = StringIO()
    print_summary(Console(file=out, width=200), summary, QuantConfig())
    text = out.getvalue()
    assert "/tmp/a[/]b/[bold]x.spqr" in text
    assert "blocks.0.[bold]q_proj" in text
    assert "text [red]calib[/].txt" in text
