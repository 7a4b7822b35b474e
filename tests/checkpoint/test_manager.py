"""The resume decisions of the CheckpointManager a run holds, without a process group (RANK and
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
from megakto._demo.tiny_model import make_tiny_model
from megakto.checkpoint import CheckpointManager, resume, universal
from megakto.distributed.parallel import ParallelDims
from megakto.errors import MegaktoError
from megakto.model.meta import param_shapes
from tests.checkpoint.test_checkpoint import FakeEngine

SEED, STEP = 7, 4


STAGE0 = "mp_rank_00_model_states.pt"  # ZeRO stage 0: the whole model and optimizer, one per-model file
ZERO = "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # ZeRO 1-3: a per-rank optimizer partition


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def _saved(tmp_path, monkeypatch, *, world_size, file=STAGE0, extra=None, **manifest):
    """A step-4 checkpoint of ``world_size`` ranks, each rank's RNG states seeded 100 + rank;
    ``extra``: more trainer state; ``manifest``: keys to change in its manifest."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    random.seed(100), np.random.seed(100), torch.manual_seed(100)
    state = {"step": STEP, "sampler": {"global_batch_size": 16}, "rng": checkpoint.rng_state(), "eval_history": [],
             "vocab_layout": [], **(extra or {})}
    path = checkpoint.save(FakeEngine({}, name=file), str(tmp_path / "checkpoints"), STEP, state, keep_last=2, dtype="float32")
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


SAMPLER = SimpleNamespace(load_state_dict=lambda state: None)  # the sampler's own resume: tests/data/test_sampler.py


def _manager(path, monkeypatch, *, rank, world_size, model_path="unused", tp=1):
    """The CheckpointManager of a run resuming ``train.resume=path``, as rank ``rank`` of ``world_size``."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    cfg = SimpleNamespace(train=SimpleNamespace(global_batch_size=16, resume=path), seed=SEED,
                          output_dir=os.path.dirname(os.path.dirname(path)),
                          model=SimpleNamespace(path=model_path, trust_remote_code=False))
    dims = ParallelDims(world_size=world_size, global_batch_size=16, micro_batch_size=1, rank=rank, tp=tp)
    manager = CheckpointManager(cfg, dims, dtype=torch.float32, log=print)
    assert manager.resume_dir == path
    return manager


def _resume(path, monkeypatch, *, rank, world_size):
    """The manager's prepare, then its resume of a policy, as rank ``rank`` of ``world_size``; the
    state it took."""
    monkeypatch.setattr(resume, "load_engine", lambda policy, tag_dir: None)
    manager = _manager(path, monkeypatch, rank=rank, world_size=world_size)
    manager.prepare(SAMPLER)
    step, _ = manager.resume(SimpleNamespace(module=torch.nn.Linear(1, 1)))
    assert step == STEP
    return manager.resume_state


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


class _Converting(Exception):
    pass


def _models_no_conversion(tmp_path, monkeypatch):
    """The model a checkpoint was trained from and another (a narrower MLP), and the first's
    shapes; the conversion replaced by raising _Converting."""
    def convert(*args, **kwargs):
        raise _Converting()

    monkeypatch.setattr(universal, "convert", convert)
    trained, other = (make_tiny_model(tmp_path / name, seed=0, intermediate_size=size)
                      for name, size in (("trained", 128), ("other", 96)))
    return trained, other, param_shapes(str(trained))


def _tp2_shards(shapes):
    """Each of 2 tp ranks' shapes of a Llama's parameters, as AutoTP cuts them: column-parallel
    (q/k/v, gate/up, the vocabulary-parallel head) by rows, row-parallel (o, down) by columns, the
    rest whole."""
    def cut(name, shape):
        if any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")):
            return [shape[0] // 2, *shape[1:]]
        if "o_proj" in name or "down_proj" in name:
            return [shape[0], shape[1] // 2]
        return list(shape)

    return {name: cut(name, shape) for name, shape in shapes.items()}


def test_another_models_checkpoint_is_refused_before_converting(tmp_path, monkeypatch):
    """A 4-rank ZeRO checkpoint resumed on 1 rank is converted first (for 32B: hundreds of GB and
    longer than the collective timeout), so its recorded shapes are checked against model.path's
    config.json (built on the meta device) before: another model is the one-line refusal with
    nothing converted; the model it was trained from goes on to the conversion. A TP2 checkpoint (2
    ranks) resumed at tp 1 on 1 or 2 ranks the same way: its tp ranks' recorded shards are joined
    into whole Hugging Face shapes first."""
    trained, other, shapes = _models_no_conversion(tmp_path, monkeypatch)
    shards = _tp2_shards(shapes)
    assert shards != shapes
    zero = _saved(tmp_path / "dp4", monkeypatch, world_size=4, file=ZERO, extra={"param_shapes": shapes})
    tp2 = _saved(tmp_path / "tp2", monkeypatch, world_size=2, file=ZERO, extra={"param_shapes": shards}, tp_size=2)
    assert checkpoint.resume_layout(zero, 1) == checkpoint.resume_layout(tp2, 2, tp_size=1) == "convert"
    for path, worlds in ((zero, (1,)), (tp2, (1, 2))):
        with pytest.raises(MegaktoError) as err:
            _manager(path, monkeypatch, rank=0, world_size=1, model_path=str(other)).prepare(SAMPLER)
        assert str(err.value) == (
            f"train.resume: {path} holds another model's weights than model.path={other} ({len(shapes)} parameters "
            f"there, {len(shapes)} here; model.layers.0.mlp.down_proj.weight is [64, 128] there and [64, 96] here); "
            "resume with the model it was trained from")
        for world in worlds:
            with pytest.raises(_Converting):
                _manager(path, monkeypatch, rank=0, world_size=world, model_path=str(trained)).prepare(SAMPLER)
    # Every rank takes saved rank 0's trainer state at another tp size.
    assert universal.source_rank(1, 1, 2) == universal.source_rank(1, 4, 2) == 0
    assert universal.source_rank(3, 2, 2) == universal.source_rank(3, 2) == 1


def test_a_dp_checkpoint_resumes_under_tp_through_its_universal_form(tmp_path, monkeypatch):
    """A ZeRO-3 DP2 checkpoint (tp 1) resumed at tp 2 on the same 2 ranks is converted (the same
    world size, another tp size); resuming its universal folder at tp 2 compares whole shapes
    before the load and no rank compares its shards with the saved whole tensors after it; both
    ranks take rank 0's trainer state and derive their RNG states."""
    trained, other, shapes = _models_no_conversion(tmp_path, monkeypatch)
    path = _saved(tmp_path, monkeypatch, world_size=2, file=ZERO, extra={"param_shapes": shapes})
    assert checkpoint.resume_layout(path, 2) == "same"
    assert checkpoint.resume_layout(path, 2, tp_size=2) == "convert"
    with pytest.raises(_Converting):
        _manager(path, monkeypatch, rank=0, world_size=2, model_path=str(trained), tp=2).prepare(SAMPLER)
    folder = _saved(tmp_path / "u", monkeypatch, world_size=2, file=ZERO, extra={"param_shapes": shapes},
                    format=checkpoint.UNIVERSAL, for_tensor_parallel=True)
    monkeypatch.setattr(resume, "load_engine", lambda policy, tag_dir: None)
    for rank in (0, 1):
        manager = _manager(folder, monkeypatch, rank=rank, world_size=2, model_path=str(trained), tp=2)
        assert manager.prepare(SAMPLER) == folder
        policy = torch.nn.Linear(1, 1)  # shards of another shape than the saved whole tensors
        assert manager.resume(SimpleNamespace(module=policy))[0] == STEP
        assert manager.resume_state["rank"] == 0 and _draws() == _derived(rank)
    with pytest.raises(MegaktoError, match=r"down_proj.weight is \[64, 128\] there and \[64, 96\] here"):
        _manager(folder, monkeypatch, rank=0, world_size=2, model_path=str(other), tp=2).prepare(SAMPLER)


def test_a_tp_size_the_model_does_not_divide_names_the_checkpoints_layout(tmp_path, monkeypatch):
    """A TP2 checkpoint resumed at TP4 on a model with 2 key-value heads is refused at start-up,
    before the checkpoint is read or converted, in one line naming the dimension and both layouts."""
    from megakto.config import load_config
    from megakto.startup import check_run
    from tests.launcher import REPO

    model = make_tiny_model(tmp_path / "model", seed=0)
    path = _saved(tmp_path, monkeypatch, world_size=2, file=ZERO, tp_size=2)
    monkeypatch.chdir(REPO)
    for resume in ("auto", path):
        cfg = load_config(None, [f"model.path={model}", "data.train_files=t.jsonl", f"output_dir={tmp_path}",
                                 "parallel.tp_size=4", f"train.resume={resume}"])
        with pytest.raises(MegaktoError) as err:
            check_run(cfg, "ds_configs/zero3.json", world_size=4, rank=0, bf16=False, on_gpu=False)
        assert str(err.value) == (
            f"model.path={model}: parallel.tp_size=4 does not divide the key-value heads: num_key_value_heads=2; "
            f"choose a parallel.tp_size dividing 2; train.resume: {path} was written by 2 ranks as dp 1 × tp 2 × "
            "pp 1; this run is 4 ranks as dp 1 × tp 4 × pp 1")


@pytest.fixture(autouse=True)
def _keep_rng():
    """These tests reseed the global generators; give the next test what it had."""
    state = checkpoint.rng_state()
    yield
    checkpoint.set_rng_state(state)


def test_a_moved_resume_continues_the_global_sampler_and_derives_each_ranks_rng(tmp_path, monkeypatch):
    """What a resume on other ranks carries: the sampler position is global (every rank of the
    2-rank save held the same), so each of 4 ranks resuming through the universal form takes it and
    draws the global batches the saving run would have drawn next; the RNG streams were per rank and
    are re-derived from (seed, step, rank), rank 0's too (docs/checkpoint.md)."""
    from megakto.data.sampler import KTOBatchSampler

    def sampler():
        return KTOBatchSampler([i % 3 == 0 for i in range(120)], global_batch_size=16, seed=SEED)

    saving = sampler()
    for _ in range(STEP):
        saving.next_global_batch()
    path = _saved(tmp_path, monkeypatch, world_size=2, format=checkpoint.UNIVERSAL,
                  extra={"sampler": saving.state_dict()})
    following = [saving.next_global_batch() for _ in range(3)]
    monkeypatch.setattr(resume, "load_engine", lambda policy, tag_dir: None)
    for rank in range(4):
        resumed = sampler()
        manager = _manager(path, monkeypatch, rank=rank, world_size=4)
        manager.prepare(resumed)
        manager.resume(SimpleNamespace(module=torch.nn.Linear(1, 1)))
        assert manager.resume_state["rank"] == 0
        assert _draws() == _derived(rank)
        assert [resumed.next_global_batch() for _ in range(3)] == following
