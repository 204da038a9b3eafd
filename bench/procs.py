"""Process-tree helpers shared by the benchmarks: a server's or a loader's workers are child processes, and what
they cost (CPU time, memory) belongs to the figure being measured."""

from __future__ import annotations

from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants (Linux /proc); an exited process is simply absent."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid] + [member for child in children for member in process_tree(int(child))]
