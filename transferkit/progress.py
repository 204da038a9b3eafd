"""Progress bars on stderr (stdout stays clean for --json) with images/s and ETA; silent when quiet."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

# markup off: messages carry user file names, and "[/x] photo.jpg" must print as it is, not be parsed (or crash).
console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)  # a path is never broken in two


def print_warning(label: str, message: str) -> None:
    console.print(Text(label, style="yellow"), message)


class ImagesPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f} img/s" if speed else "   -- img/s", style="progress.data.speed")


class Reporter:
    """One object the training code talks to: bars for loops over images, lines for events."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def log(self, message: str) -> None:
        if not self.quiet:
            console.print(message)

    def warn(self, message: str) -> None:
        """Warnings (skipped files, fallbacks) show even with --quiet: they are about the user's data."""
        print_warning("warning:", message)

    @contextmanager
    def bar(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """A live bar on a terminal; in a log (not a terminal) one summary line with the rate instead."""
        if self.quiet or total == 0:
            yield lambda n, status="": None
            return
        if not console.is_terminal:
            start = time.perf_counter()
            yield lambda n, status="": None
            seconds = time.perf_counter() - start
            if seconds >= 1:  # a log line for every sub-second head epoch would be noise
                self.log(f"{description}: {total} images in {seconds:.1f}s ({total / max(seconds, 1e-9):.1f} img/s)")
            return
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            ImagesPerSecond(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        ]
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(description, total=total, status="")
            yield lambda n, status="": progress.update(task, advance=n, status=status)
