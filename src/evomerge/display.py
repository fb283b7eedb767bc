"""What the command line shows: progress of long commands (a rich bar on a terminal, plain dated lines in a
log) and the table of test-split results.

Every command that takes more than a moment (zoo, eval, export, merge, evolve, demo) shows one
`Progress`: a bar when the amount of work is known, a status line otherwise. On a TTY it is a transient
rich display; when stderr is a file or a pipe (a batch job's log) it prints a plain line whenever the
description changes and at most every `plain_every` seconds otherwise, so logs stay readable and short.
Work that ends (or fails) within `quiet_for` seconds prints nothing, so a quick command's log, and a user
error's one sentence, are not preceded by progress lines.
"""

from __future__ import annotations

import functools
import shlex
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table


def format_seconds(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`: short enough for a status line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"

Command = TypeVar("Command", bound=Callable[..., Any])


def interruptible(console: Console, resumable: bool) -> Callable[[Command], Command]:
    """A command decorator: on Ctrl-C anywhere in the command (its imports included), say what rerunning
    the exact command line does (resume, or start over), then let the interrupt end it (exit 130)."""

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except KeyboardInterrupt:
                line = shlex.join(["evomerge", *sys.argv[1:]])
                what = "resume where it stopped" if resumable else "start over (nothing partial was kept)"
                console.print(f"interrupted; run `{line}` again to {what}", highlight=False, markup=False,
                              soft_wrap=True)
                raise

        return wrapper  # type: ignore[return-value]

    return decorate


class Progress:
    """One unit of work: `update(completed=, advance=, total=, description=, info=)`; a context manager."""

    def __init__(self, console: Console, description: str, *, total: float | None = None,
                 plain_every: float = 30.0, quiet_for: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.description = description
        self.total = total
        self.completed = 0.0
        self.info = ""
        self.plain_every = plain_every
        self.quiet_for = quiet_for
        self.clock = clock
        self._printed = False
        self.interactive = console.is_terminal
        self._last_line = -float("inf")
        self._started = clock()
        self._rich: RichProgress | None = None
        if self.interactive:
            self._rich = RichProgress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console, transient=True,
            )
            self._task = self._rich.add_task(description, total=total, info="")

    def __enter__(self) -> Self:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif kind is None and self._printed:  # the log shows where the work ended
            self._plain(force=True)

    def update(self, *, completed: float | None = None, advance: float = 0, total: float | None = None,
               description: str | None = None, info: str | None = None) -> None:
        """Move the bar and/or change its text."""
        changed = description is not None and description != self.description
        if total is not None:
            self.total = total
        if completed is not None:
            self.completed = completed
        self.completed += advance
        if description is not None:
            self.description = description
        if info is not None:
            self.info = info
        if self._rich is not None:
            self._rich.update(self._task, completed=self.completed, total=self.total, description=self.description,
                              info=self.info)
        else:
            self._plain(force=changed)

    def _plain(self, *, force: bool) -> None:
        now = self.clock()
        if now - self._started < self.quiet_for or (not force and now - self._last_line < self.plain_every):
            return
        self._last_line = now
        self._printed = True
        count = "" if self.total is None else f" {self.completed:g}/{self.total:g}"
        info = f"  {self.info}" if self.info else ""
        elapsed = format_seconds(now - self._started)
        self.console.print(f"[{time.strftime('%H:%M:%S')}] {self.description}{count}{info} ({elapsed})",
                           highlight=False, soft_wrap=True, markup=False)


class SearchProgress:
    """The live view of a search: candidates done of the budget, rate, ETA, best so far against the best
    parent (`CandidateResult.finished`, `.budget`, `.best_parent`), examples racing saved."""

    def __init__(self, console: Console, budget: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        # The total is known from the config before the first candidate (the bar reads 0/400, not 0/?).
        self.progress = Progress(console, "starting the search", total=budget, clock=clock)
        self.best: float | None = None
        self.saved = 0
        self.first: tuple[float, int] | None = None  # (time, finished) when the first candidate of this process ended

    def status(self, message: str) -> None:
        # A phase other than the candidates (baselines, test scoring): the last candidate's figures would be stale.
        self.progress.update(description=message, info="")

    def candidate(self, result) -> None:
        """Show one finished candidate (`search.run.CandidateResult`)."""
        now = self.clock()
        self.saved += result.examples_saved
        if result.status == "complete" and result.fitness is not None:
            self.best = result.fitness if self.best is None else max(self.best, result.fitness)
        parts = [f"gen {result.generation}", f"best {_score(self.best)}"]
        if result.best_parent is not None:
            parts.append(f"(best parent {_score(result.best_parent)})")
        # The rate is measured between candidates this process finished: the first one's start is not seen,
        # and a resumed run's earlier candidates took no time here.
        if self.first is None:
            self.first = (now, result.finished)
        elif result.finished > self.first[1] and now > self.first[0]:
            rate = (result.finished - self.first[1]) / (now - self.first[0])
            parts.append(f"{60 * rate:.1f}/min")
            if result.budget:
                parts.append(f"ETA {format_seconds(max(result.budget - result.finished, 0) / rate)}")
        if self.saved:
            parts.append(f"saved {self.saved} examples (racing or estimates)")
        self.progress.update(description="candidates", completed=result.finished, total=result.budget or None,
                             info="  ".join(parts))


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def results_table(test_results: dict, title: str) -> Table:
    """Parents, baselines and selected candidates with their test-split score ± stderr per task."""
    tasks = sorted({task for result in test_results.values() for task in (result.get("test") or {})})
    table = Table(title=title)
    table.add_column("model")
    table.add_column("role")
    for task in tasks:
        table.add_column(f"{task} (test)", justify="right")
    for name, result in test_results.items():
        role = ", ".join(result.get("roles", [result["kind"]]))
        cells = []
        for task in tasks:
            entry = (result.get("test") or {}).get(task)
            cells.append("-" if entry is None else f"{entry['score']:.3f} ± {entry['stderr'] or 0:.3f}")
        table.add_row(name, role, *cells)
    return table
