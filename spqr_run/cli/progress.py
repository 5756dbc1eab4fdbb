"""Progress of long steps (downloading, quantizing, loading, scoring): rich bars on a terminal, plain lines
elsewhere.

Off a terminal (piped, redirected to a log, under CI) rich cannot redraw a bar: it prints the final state of
every bar once, at the end, cut to the console width. `LineProgress` is a rich `Progress` (the same calls:
`add_task`, `update`, `advance`, `reset`) that draws nothing and instead writes one plain, complete line as
the work goes: when a step starts, at most about once a second while it advances (when its description or
its tenth of the work changes), and when it is done, with the elapsed time and an estimate of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.progress import GetTimeCallable, Progress, ProgressColumn, TaskID
from rich.text import Text

from spqr_run.cli.common import printable


def make_progress(*columns: str | ProgressColumn, console: Console, transient: bool = False) -> Progress:
    """Bars with `columns` on `console` when it is a terminal, else a `LineProgress` writing lines to it."""
    if console.is_terminal:
        return Progress(*columns, console=console, transient=transient)
    return LineProgress(console=console)


@dataclass
class _Shown:
    """What was last written about one task."""

    at: float = 0.0  # when
    description: str = ""
    tenth: int = -1  # completed * 10 // total
    counted: bool = True  # the task had a total when it started (else it is a phase: "done in ...")
    done: bool = False


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


class LineProgress(Progress):
    """A `Progress` that writes plain lines to its console instead of drawing bars (see the module doc)."""

    MIN_INTERVAL_S = 1.0  # between two lines about the same task, except its first and its last

    def __init__(self, *, console: Console, get_time: GetTimeCallable | None = None) -> None:
        super().__init__(console=console, disable=True, get_time=get_time)
        self._shown: dict[TaskID, _Shown] = {}

    def add_task(
        self,
        description: str,
        start: bool = True,
        total: float | None = 100.0,
        completed: int = 0,
        visible: bool = True,
        **fields: object,
    ) -> TaskID:
        task_id = super().add_task(description, start, total, completed, visible, **fields)
        self._report(task_id, first=True)
        return task_id

    def update(self, task_id: TaskID, **kwargs: object) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)  # type: ignore[arg-type]
        self._report(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def reset(self, task_id: TaskID, **kwargs: object) -> None:  # type: ignore[override]
        super().reset(task_id, **kwargs)  # type: ignore[arg-type]
        self._report(task_id)

    def _report(self, task_id: TaskID, *, first: bool = False) -> None:
        task = self._tasks[task_id]
        if not task.visible:
            return
        total = task.total
        finished = total is not None and task.completed >= total
        shown = self._shown.get(task_id)
        if shown is not None and shown.done and not finished:
            first = True  # a finished task started over (a new phase under a new description)
        first = first or shown is None
        if first:
            shown = self._shown[task_id] = _Shown(counted=total is not None)
        assert shown is not None
        now = self.get_time()
        done = finished and not first
        if done and shown.done:
            return
        tenth = int(task.completed * 10 // total) if total else -1
        due = now - shown.at >= self.MIN_INTERVAL_S
        changed = task.description != shown.description or tenth > shown.tenth
        if not (first or done or (changed and due)):
            return
        elapsed = task.elapsed or 0.0
        if done:
            counts = f", {_count(task.completed)}/{_count(total)}" if shown.counted else ""  # type: ignore[arg-type]
            line = f"{task.description}: done{counts} in {clock(elapsed)}"
        elif total is None:
            line = f"{task.description} ..."
        else:
            line = f"{task.description}: {_count(task.completed)}/{_count(total)} ({task.percentage:.0f}%)"
            if elapsed > 0 and task.completed > 0 and not first:
                rest = elapsed / task.completed * (total - task.completed)
                line += f", {clock(elapsed)} elapsed, eta {clock(rest)}"
        self.console.print(Text(printable(line)), soft_wrap=True, highlight=False)
        shown.at, shown.description, shown.tenth, shown.done = now, task.description, tenth, done
