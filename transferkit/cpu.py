"""What this CPU can do, read from /proc/cpuinfo: every recorded figure names it, and CPU-dependent choices read it."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

# A dense fit with fewer multiply-adds per pass (rows x features x outputs) runs on one BLAS thread: a second thread
# made head-sized scikit-learn fits up to 7.5x slower on 2 cores, and first paid at about 2.6e9 (decision 0305).
ONE_BLAS_THREAD_BELOW = 1e9

# The instruction sets that change our numbers: AVX-512 and AVX2 speed, VNNI int8 (without it u8 x s8 sums
# saturate), BF16/AMX bf16 arithmetic in hardware rather than emulated.
ISA_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx_vnni": "AVX-VNNI",
             "avx512_bf16": "BF16", "amx_bf16": "AMX-BF16"}


@cache
def _cpuinfo(field: str) -> str | None:
    """The first /proc/cpuinfo line's value for `field` (all cores report the same); None where unknown."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: nothing known, so nothing assumed
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == field), None)


def cpu_flags() -> frozenset[str]:
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def isa_summary() -> str:
    """e.g. 'AVX2 AVX-512 VNNI BF16' or 'AVX2': the flags that matter here, in a fixed order."""
    flags = cpu_flags()
    return " ".join(name for flag, name in ISA_FLAGS.items() if flag in flags) or "no AVX2"


def has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def describe() -> str:
    """One line for logs and benchmark tables: model, the flags that matter, usable cores."""
    return f"{cpu_model()} ({isa_summary()}), {len(os.sched_getaffinity(0))} cores"


def one_blas_thread(rows: int, features: int, outputs: int) -> bool:
    """Whether a dense fit this size runs on one BLAS thread (ONE_BLAS_THREAD_BELOW multiply-adds per pass)."""
    return rows * features * max(outputs, 1) < ONE_BLAS_THREAD_BELOW


def blas_threads() -> int:
    """The most threads a loaded BLAS library (OpenBLAS, MKL) would use now."""
    from threadpoolctl import threadpool_info  # scikit-learn's own dependency; only where it is asked

    return max((lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"), default=1)


@contextmanager
def blas_threads_for(rows: int, features: int, outputs: int) -> Iterator[None]:
    """One BLAS thread (OpenBLAS/MKL under numpy, scipy and scikit-learn) inside the block when the problem is small
    (ONE_BLAS_THREAD_BELOW); a larger one keeps the process's threads."""
    if not one_blas_thread(rows, features, outputs):
        yield
        return
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency; only where a fit runs

    with threadpool_limits(limits=1, user_api="blas"):
        yield
