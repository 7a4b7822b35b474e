"""megakto/peak_memory.py: glibc's heap figures beside the resident set (unit)."""

from types import SimpleNamespace

from megakto.peak_memory import glibc_heap, heap_figures


def test_glibc_heap_reads_used_free_and_mmapped_bytes():
    info = SimpleNamespace(arena=10_000, ordblks=3, smblks=0, hblks=2, hblkhd=5 << 20, usmblks=0, fsmblks=0,
                           uordblks=7_000, fordblks=3_000, keepcost=128)
    assert glibc_heap(info) == {"heap_used": 7_000, "heap_free": 3_000, "mmapped": 5 << 20}


def test_heap_figures_sees_a_large_block_mmapped_and_its_free():
    import torch

    before = heap_figures()
    assert set(before) == {"rss", "heap_used", "heap_free", "mmapped"} and before["rss"] > 0
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
    during = heap_figures()
    assert during["mmapped"] - before["mmapped"] >= 64 << 20
    del block
    assert heap_figures()["mmapped"] - before["mmapped"] < 64 << 20


def test_run_peak_names_live_and_retained_apart():
    from megakto.peak_memory import GIB, RunPeak

    peak = RunPeak(max_bytes=3 * GIB, min_bytes=2 * GIB, max_reserved_bytes=4 * GIB, max_retained_bytes=GIB // 2)
    assert peak.metrics(on_gpu=False) == {"memory/peak_gib": 3.0, "memory/peak_gib_min": 2.0,
                                          "memory/retained_gib": 0.5}
    assert peak.metrics(on_gpu=True) == {"memory/peak_gib": 3.0, "memory/peak_gib_min": 2.0,
                                         "memory/peak_reserved_gib": 4.0}
    assert peak.describe(on_gpu=False).endswith("glibc now keeps 0.500 GiB of freed heap on the rank keeping the most "
                                                "(counted in RSS, not live)")
    assert "reserved 4.000 GiB" in peak.describe(on_gpu=True)
