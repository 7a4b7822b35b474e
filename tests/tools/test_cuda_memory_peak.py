"""tools/cuda_memory_peak.py: the peak and the blocks live at it, replayed from a memory-history trace
of made-up events (the format torch.cuda.memory._snapshot writes), and the file read end to end."""

import pickle

from tests.launcher import load_script

cmp = load_script("tools/cuda_memory_peak.py", "megakto_tools_cuda_memory_peak")


def _frames(*names):
    return [{"filename": f"/site-packages/{n.split(':')[0]}", "line": 1, "name": n.split(":")[1]} for n in names]


STEP = _frames("torch/optim/adamw.py:_init_group", "deepspeed/runtime/zero/stage3.py:step")
GATHER = _frames("deepspeed/runtime/zero/partition_parameters.py:_all_gather",
                 "megakto/reference/scorers.py:logps")
ACT = _frames("transformers/models/llama/modeling_llama.py:forward", "megakto/runners/zero.py:_forward")
TRACE = [
    {"action": "alloc", "addr": 1, "size": 400, "frames": STEP},
    {"action": "alloc", "addr": 2, "size": 300, "frames": GATHER},
    {"action": "free_requested", "addr": 2, "size": 300, "frames": GATHER},
    {"action": "free_completed", "addr": 2, "size": 300, "frames": GATHER},   # 400 live
    {"action": "alloc", "addr": 3, "size": 250, "frames": ACT},
    {"action": "alloc", "addr": 4, "size": 100, "frames": ACT},               # 750 live: the peak
    {"action": "free_completed", "addr": 3, "size": 250, "frames": ACT},
    {"action": "alloc", "addr": 5, "size": 200, "frames": GATHER},            # 700 live
]


def test_peak_and_the_blocks_live_at_it():
    """400 + 250 + 100 = 750 bytes at the peak (the 300-byte gather was freed before it)."""
    peak, blocks = cmp.peak_blocks(TRACE)
    assert peak == 750 and sorted(b["addr"] for b in blocks) == [1, 3, 4]


def test_grouped_by_the_innermost_megakto_frame_first():
    """Each block goes to its innermost megakto frame, else DeepSpeed's, then transformers', then torch's."""
    _, blocks = cmp.peak_blocks(TRACE)
    assert cmp.by_site(blocks) == [("deepspeed/runtime/zero/stage3.py:1 step", 400, 1),
                                   ("megakto/runners/zero.py:1 _forward", 350, 2)]


def test_reads_a_snapshot_file(tmp_path, capsys):
    path = tmp_path / "rank0.pickle"
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [TRACE]}))
    assert cmp.main([str(path), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "peak 0 MiB allocated at once" in out and "in 3 blocks" in out
    assert "deepspeed/runtime/zero/stage3.py:1 step" in out and "(1 other sites)" in out
    empty = tmp_path / "empty.pickle"
    empty.write_bytes(pickle.dumps({"segments": [], "device_traces": [[]]}))
    assert cmp.main([str(empty)]) == 1
    assert "no allocations recorded" in capsys.readouterr().err
