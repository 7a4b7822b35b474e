"""KTOTrainer's resume decisions, on a stand-in ``self`` without a process group (RANK and
WORLD_SIZE set as the launcher sets them): which saved trainer state each rank takes, whether its
RNG states are restored or derived, and what is refused before any conversion. Checkpoints are
written by megakto.checkpoint.save through a fake DeepSpeed engine; the real multi-rank resumes
are tests/e2e/test_universal_resume.py."""

import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megakto import checkpoint
from megakto.trainer import KTOTrainer

SEED, STEP = 7, 4


class _CheckpointEngine:
    def save(self, state_dict, path):
        torch.save(state_dict, path)


class _Stage0Engine:
    """DeepSpeed's save at ZeRO stage 0: the whole model and optimizer in one per-model file."""

    def __init__(self):
        self.checkpoint_engine = _CheckpointEngine()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        self.checkpoint_engine.save({"module": {}}, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def _saved(tmp_path, monkeypatch, *, world_size, **manifest):
    """A step-4 checkpoint of ``world_size`` ranks, each rank's RNG states seeded 100 + rank;
    ``manifest``: keys to change in its manifest."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    random.seed(100), np.random.seed(100), torch.manual_seed(100)
    state = {"step": STEP, "sampler": {"global_batch_size": 16}, "rng": checkpoint.rng_state(), "eval_history": [],
             "vocab_layout": []}
    path = checkpoint.save(_Stage0Engine(), str(tmp_path / "checkpoints"), STEP, state, keep_last=2, dtype="float32")
    for rank in range(1, world_size):  # the other ranks' files, as they would have written them
        random.seed(100 + rank), np.random.seed(100 + rank), torch.manual_seed(100 + rank)
        torch.save({"version": checkpoint.STATE_VERSION, "rank": rank, "world_size": world_size, **state,
                    "rng": checkpoint.rng_state()}, os.path.join(path, checkpoint.state_file(rank)))
    if manifest:
        with open(os.path.join(path, checkpoint.MANIFEST)) as fh:
            written = json.load(fh)
        with open(os.path.join(path, checkpoint.MANIFEST), "w") as fh:
            json.dump({**written, **manifest}, fh)
    return path


def _resume(path, monkeypatch, *, rank, world_size):
    """_prepare_resume then _setup_resume as rank ``rank`` of ``world_size``; the state it took."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setattr(checkpoint, "load_engine", lambda policy, tag_dir: None)
    cfg = SimpleNamespace(train=SimpleNamespace(global_batch_size=16), seed=SEED, output_dir=os.path.dirname(path),
                          model=SimpleNamespace(path="unused"))
    me = SimpleNamespace(resume_dir=path, dims=SimpleNamespace(tp=1), cfg=cfg, log=SimpleNamespace(info=print),
                         sampler=SimpleNamespace(load_state_dict=lambda state: None),
                         policy=SimpleNamespace(module=torch.nn.Linear(1, 1)))
    me._check_same_model = lambda *args: None
    me.resume_state, me.load_dir = KTOTrainer._prepare_resume(me)
    assert KTOTrainer._setup_resume(me) == STEP
    return me.resume_state


def _derived(rank):
    checkpoint.derive_rng_state(SEED, STEP, rank)
    return _draws()


def _restored(path, rank):
    checkpoint.set_rng_state(checkpoint.load_state(path, rank)["rng"])
    return _draws()


def test_a_stage0_checkpoint_resumes_on_more_ranks(tmp_path, monkeypatch):
    """ZeRO stage 0 keeps the whole model and optimizer in per-model files, which DeepSpeed loads
    at any data-parallel size; but the trainer states are per rank: 2 ranks saved, so rank 3 of 4
    takes rank 0's (the sampler state is global) and derives its RNG states, as rank 0 does."""
    path = _saved(tmp_path, monkeypatch, world_size=2)
    assert checkpoint.resume_layout(path, 4) == "same"  # DeepSpeed loads its own files
    for rank in (3, 0):
        assert _resume(path, monkeypatch, rank=rank, world_size=4)["rank"] == 0
        assert _draws() == _derived(rank)
    # The ranks that wrote it restore their own states.
    assert _resume(path, monkeypatch, rank=1, world_size=2)["rank"] == 1
    assert _draws() == _restored(path, 1)


def test_a_universal_checkpoint_derives_rng_on_every_rank(tmp_path, monkeypatch):
    """A universal folder resumed at the size that wrote it: every rank takes rank 0's trainer
    state, so every rank, rank 0 too, derives its RNG states (rank 0 restoring its own while the
    others derive would be neither the saved run nor the documented rule)."""
    path = _saved(tmp_path, monkeypatch, world_size=2, format=checkpoint.UNIVERSAL)
    for rank in (0, 1):
        assert _resume(path, monkeypatch, rank=rank, world_size=2)["rank"] == 0
        assert _draws() == _derived(rank) != _restored(path, 0)


@pytest.fixture(autouse=True)
def _keep_rng():
    """These tests reseed the global generators; give the next test what it had."""
    state = checkpoint.rng_state()
    yield
    checkpoint.set_rng_state(state)
