"""tools/memory_timeline.py: the live-bytes timeline it reads from the profiler's events (unit)."""

from tests.launcher import load_script

mt = load_script("tools/memory_timeline.py", "megakto_tools_memory_timeline")


def test_timeline_by_hand():
    # +100 at t=1, +50 at 3, -100 at 5, +200 at 7, -250 at 9: live 100, 150, 50, 250, 0.
    memory = [(5, -100), (1, 100), (3, 50), (7, 200), (9, -250)]
    ranges = [(0, 4, "a"), (4, 10, "b"), (6, 8, "b.inner")]
    rows, peak = mt.timeline(memory, ranges)
    by = {r["name"]: r for r in rows}
    assert (by["a"]["entry"], by["a"]["most"], by["a"]["exit"]) == (0, 150, 150)
    assert (by["b"]["entry"], by["b"]["most"], by["b"]["exit"]) == (150, 250, 0)
    assert (by["b.inner"]["entry"], by["b.inner"]["most"], by["b.inner"]["exit"]) == (50, 250, 250)
    # b's entry (t=4) to the peak: -100 (no allocation of that size in b: dropped) and +200.
    assert peak == {"bytes": 250, "time": 7, "stack": ["b", "b.inner"], "since": "b", "sizes": [(200, 1)]}
    # With "a" and "b" the phases, from the innermost of them holding the peak (b, not b.inner).
    assert mt.timeline(memory, ranges, frozenset({"a", "b"}))[1]["since"] == "b"
    assert mt.timeline(memory, ranges + [(0, 10, "all")], frozenset({"b"}))[1]["sizes"] == [(200, 1)]
    assert mt.timeline(memory, ranges + [(0, 10, "all")])[1]["sizes"] == [(200, 1), (50, 1)]


def test_rss_peaks_credit_each_boundarys_peak_to_every_open_phase():
    """--rss: the kernel's peak since the last reset, read at each boundary, goes to every phase open
    across it; an inner phase's peak is its outer's too, a later sibling's is not its earlier one's."""
    peaks = iter([100, 500, 300, 200, 150, 120])  # VmHWM at each boundary (reset after each read)
    tracker = mt.RssPeaks(lambda: next(peaks), lambda: None)
    tracker.enter("step", 90)        # boundary 1: 100, nothing open yet
    tracker.enter("backward", 95)    # boundary 2: 500 -> step
    tracker.exit()                   # boundary 3: 300 -> step, backward
    tracker.enter("optimizer", 210)  # boundary 4: 200 -> step
    tracker.exit()                   # boundary 5: 150 -> step, optimizer
    tracker.exit()                   # boundary 6: 120 -> step
    assert tracker.done == [("backward", 1, 300, 95), ("optimizer", 1, 210, 210), ("step", 0, 500, 90)]
