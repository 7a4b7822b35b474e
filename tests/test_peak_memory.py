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
