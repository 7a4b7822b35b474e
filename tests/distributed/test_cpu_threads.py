"""engine.configure_cpu_threads: each local rank gets its share of the node's cores on CPU, and on a
GPU (the DeepSpeed runtime's ``on_gpu`` patched to say so) when the optimizer or parameters live in host memory, where
8 ranks would otherwise run their CPU AdamW steps with all cores each at the same moment."""

import os

import pytest
import torch

from megakto.config import load_config
from megakto.distributed import engine
from megakto.distributed._deepspeed import runtime
from megakto.startup import offloads_to_host

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def node(monkeypatch):
    """16 cores, 4 local ranks, no OMP_NUM_THREADS; torch's own thread count restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    yield monkeypatch
    torch.set_num_threads(before)


@pytest.mark.parametrize("gpu, offloaded, threads", [
    (False, False, 4),  # CPU, as before: 16 cores // 4 ranks
    (True, True, 4),  # GPU with host offload: partitioned too
    (True, False, None),  # GPU, nothing on the host: left alone
])
def test_threads_per_local_rank(node, gpu, offloaded, threads):
    node.setattr(runtime, "on_gpu", lambda: gpu)
    torch.set_num_threads(3)
    assert engine.configure_cpu_threads(offloaded=offloaded) == threads
    assert torch.get_num_threads() == (threads or 3)


def test_omp_num_threads_wins(node):
    node.setattr(runtime, "on_gpu", lambda: True)
    node.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(3)
    assert engine.configure_cpu_threads(offloaded=True) is None and torch.get_num_threads() == 3


def test_what_counts_as_host_offload(tmp_path):
    def cfg(*extra):
        return load_config(None, ["model.path=m", "data.train_files=t.jsonl", *extra])

    z3, z3o = (os.path.join(REPO, "ds_configs", n) for n in ("zero3.json", "zero3_offload_optimizer.json"))
    assert offloads_to_host(cfg("ref.mode=cache"), z3o)  # the optimizer
    assert offloads_to_host(cfg("ref.mode=online", "ref.offload=cpu"), z3)  # the online reference's parameters
    assert not offloads_to_host(cfg("ref.mode=online", "ref.offload=none"), z3)
    assert not offloads_to_host(cfg("ref.mode=cache"), z3)
    assert not offloads_to_host(cfg("ref.mode=cache"), str(tmp_path / "missing.json"))  # check_run reports it
