"""The CPU is read, named beside figures, and CPU-dependent choices follow what it has."""

from __future__ import annotations

import torch

from transferkit import cpu
from transferkit.training.compute import Compute

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})
ZEN4 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}


def test_isa_summary_names_what_changes_our_numbers(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: ZEN4)
    assert cpu.isa_summary() == "AVX2 AVX-512 VNNI BF16" and cpu.has_bf16()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: AVX2_ONLY)
    assert cpu.isa_summary() == "AVX2" and not cpu.has_bf16()
    assert "(AVX2)" in cpu.describe() and "cores" in cpu.describe()


def test_this_machine_is_described():
    assert "AVX2" in cpu.isa_summary() or cpu.isa_summary() == "no AVX2"
    assert cpu.cpu_model()


def test_bf16_on_a_cpu_without_it_warns(monkeypatch, capsys):
    monkeypatch.setattr(cpu, "has_bf16", lambda: False)
    Compute(torch.device("cpu"), "bf16")
    assert "bf16 is emulated" in capsys.readouterr().err
    monkeypatch.setattr(cpu, "has_bf16", lambda: True)
    Compute(torch.device("cpu"), "bf16")
    assert capsys.readouterr().err == ""


def test_a_small_fit_runs_on_one_blas_thread_and_a_large_one_keeps_the_process_s():
    """Decision 0305: a second BLAS thread made head-sized fits slower; problems from ONE_BLAS_THREAD_BELOW keep
    what the process has."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):
        before = cpu.blas_threads()
        with cpu.blas_threads_for(250, 1280, 11):
            assert cpu.blas_threads() == 1
        assert cpu.blas_threads() == before
        with cpu.blas_threads_for(20000, 1280, 100):
            assert cpu.blas_threads() == before
