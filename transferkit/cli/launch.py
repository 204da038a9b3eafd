"""`train --num-processes N`: the same command in N processes on this machine, wired as `accelerate launch` and
torchrun wire theirs (MASTER_ADDR/PORT, WORLD_SIZE, RANK, LOCAL_RANK), so training finds its place through
accelerate either way. Started here rather than through `accelerate launch` so that a bad input stays one line
and exit status 2 (the launcher would add its own traceback), and a failed rank stops the others at once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack


def without_option(argv: list[str], option: str) -> list[str]:
    """argv less `option VALUE` and `option=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            out.append(arg)
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_processes(count: int, argv: list[str]) -> int:
    """Run `transferkit *argv` (less --num-processes) as ranks 0..count-1; the exit status of the first to fail,
    else 0. Rank 0 talks to the terminal; another rank's last message is shown only if rank 0 did not fail too."""
    args = without_option(argv, "--num-processes")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(count),
           "LOCAL_WORLD_SIZE": str(count)}
    # the cores shared out, as torchrun does, instead of every rank starting a thread per core
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
    with ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(count - 1)]
        processes = [subprocess.Popen([sys.executable, "-m", "transferkit", *args],
                                      env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                      stdout=None if rank == 0 else subprocess.DEVNULL,
                                      stderr=None if rank == 0 else logs[rank - 1])
                     for rank in range(count)]
        try:
            failed = _wait_first_failure(processes)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.terminate()
            for process in processes:
                process.wait()
        if failed is None:
            return 0
        rank, code = failed
        if rank > 0:
            logs[rank - 1].seek(0)
            tail = logs[rank - 1].read().decode(errors="replace").strip().splitlines()[-1:]
            print(f"transferkit: error: rank {rank} failed: {tail[0] if tail else f'exit status {code}'}",
                  file=sys.stderr)
        return code


def _wait_first_failure(processes: list[subprocess.Popen], grace: float = 3.0) -> tuple[int, int] | None:
    """(rank, exit status) of a failed process — rank 0's if it fails too within `grace` seconds of the first
    (a bad input fails every rank; rank 0 has already said why) — or None when all succeed."""
    while True:
        codes = [process.poll() for process in processes]
        if all(code == 0 for code in codes):
            return None
        failures = [(rank, code) for rank, code in enumerate(codes) if code]
        if failures:
            deadline = time.monotonic() + grace
            while processes[0].poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            return (0, processes[0].returncode) if processes[0].returncode else failures[0]
        time.sleep(0.1)
