"""The checkpoint protocol without a process group: tag directories, manifests, what resume picks,
pruning, RNG and trainer state through ``weights_only=True``, and the pickle scan that guards
DeepSpeed's own loaders. DeepSpeed's save is replaced by a fake engine that writes one file per
rank, so every line of megakto.checkpoint.save runs (the barriers are no-ops at world size 1)."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from megakto import checkpoint
from megakto.data.sampler import KTOBatchSampler
from megakto.distributed import engine
from megakto.distributed._deepspeed import checkpoint_io
from megakto.errors import ConfigError, ModelError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WEIGHTS = "zero_pp_rank_0_mp_rank_00_model_states.pt"


class FakeCheckpointEngine:
    """DeepSpeed's checkpoint engine writes every file through ``save(state_dict, path)``."""

    def save(self, state_dict, path):
        torch.save(state_dict, path)


class FakeEngine:
    """Stands in for DeepSpeed's engine: save_checkpoint writes one torch file ``name`` (holding
    ``payload``) into save_dir/tag through its checkpoint engine."""

    def __init__(self, payload=b"weights", name=WEIGHTS):
        self.payload, self.name = payload, name
        self.calls = []
        self.checkpoint_engine = FakeCheckpointEngine()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.calls.append((tag, save_latest))
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        self.checkpoint_engine.save(self.payload, os.path.join(save_dir, tag, self.name))


def _save(ckpt_dir, step, keep_last=10, payload=b"weights"):
    fake = FakeEngine(payload)
    path = checkpoint.save(fake, str(ckpt_dir), step, {"step": step, "sampler": {"batches_emitted": step}},
                           keep_last=keep_last, dtype="float32")
    return fake, path


def test_save_commits_one_complete_tag(tmp_path):
    """DeepSpeed writes into .tmp-step-N with its own `latest` off; the committed step-N holds its
    files, this rank's trainer state and a manifest listing both with their sizes."""
    fake, path = _save(tmp_path, 12)
    assert fake.calls == [(".tmp-step-00000012", False)]
    assert path == str(tmp_path / "step-00000012")
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000012"]
    assert (tmp_path / "latest").read_text() == "step-00000012"
    manifest = json.loads((tmp_path / "step-00000012" / "complete").read_text())
    assert manifest["step"] == 12 and manifest["world_size"] == 1 and manifest["dtype"] == "float32"
    assert manifest["files"] == {"trainer_state_rank0.pt": os.path.getsize(tmp_path / path / "trainer_state_rank0.pt"),
                                 WEIGHTS: os.path.getsize(tmp_path / path / WEIGHTS)}
    assert checkpoint.problem(path) is None
    state = checkpoint.load_state(path)
    assert state == {"version": 1, "rank": 0, "world_size": 1, "step": 12, "sampler": {"batches_emitted": 12}}


def test_problem_names_what_is_wrong(tmp_path):
    _, path = _save(tmp_path, 3)
    weights = os.path.join(path, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with open(weights, "ab") as f:
        f.write(b"!")
    size = os.path.getsize(weights)
    assert checkpoint.problem(path) == f"{WEIGHTS} has {size} bytes, the manifest says {size - 1}"
    os.remove(weights)
    assert checkpoint.problem(path) == "zero_pp_rank_0_mp_rank_00_model_states.pt is missing"
    os.remove(os.path.join(path, "complete"))
    assert "no 'complete' manifest" in checkpoint.problem(path)
    assert checkpoint.problem(str(tmp_path / "nowhere")) == "no such directory"


@pytest.mark.gloo
def test_crash_before_commit_keeps_previous(tmp_path):
    """MEGAKTO_FAULT_EXIT_IN_SAVE=8 kills the process (exit 1) after step 8's files are written
    and before the commit: step 8 is a .tmp directory without manifest, `latest` still names step
    4, resume picks step 4, and the next save cleans the leftover up."""
    _save(tmp_path, 4)
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from tests.checkpoint.test_checkpoint import _save; "
            "_save(sys.argv[1], 8)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), REPO], capture_output=True, text=True,
                          env={**os.environ, checkpoint.FAULT_ENV: "8"}, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == [".tmp-step-00000008", "latest", "step-00000004"]
    assert sorted(os.listdir(tmp_path / ".tmp-step-00000008")) == ["trainer_state_rank0.pt",
                                                                  "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    assert (tmp_path / "latest").read_text() == "step-00000004"
    assert checkpoint.newest_complete(str(tmp_path)) == str(tmp_path / "step-00000004")
    _save(tmp_path, 6)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000004", "step-00000006"]


def test_newest_complete_skips_unfinished_and_damaged(tmp_path):
    for step in (2, 4, 10):
        _save(tmp_path, step)
    os.rename(tmp_path / "step-00000010", tmp_path / ".tmp-step-00000010")  # as if never committed
    os.makedirs(tmp_path / "step-00000012")  # a directory without manifest
    assert [s for s, _ in checkpoint.complete_tags(str(tmp_path))] == [2, 4]
    assert checkpoint.newest_complete(str(tmp_path)) == str(tmp_path / "step-00000004")
    os.remove(tmp_path / "step-00000004" / "trainer_state_rank0.pt")
    assert checkpoint.newest_complete(str(tmp_path)) == str(tmp_path / "step-00000002")
    # Order is numeric, not lexicographic, past 8 digits.
    _save(tmp_path, 123456789)
    _save(tmp_path, 99999999)
    assert checkpoint.newest_complete(str(tmp_path)).endswith("step-123456789")


def test_resolve_resume(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert checkpoint.resolve_resume("none", str(tmp_path), world_size=1) is None
    assert checkpoint.resolve_resume("auto", str(tmp_path), world_size=1) is None  # fresh start
    _save(ckpt, 2)
    _save(ckpt, 4)
    assert checkpoint.resolve_resume("auto", str(tmp_path), world_size=1) == str(ckpt / "step-00000004")
    step2 = str(ckpt / "step-00000002")
    assert checkpoint.resolve_resume(step2, "elsewhere", world_size=1) == step2
    with pytest.raises(ConfigError, match=r"^train.resume=\S+missing: not a loadable checkpoint: no such directory;"):
        checkpoint.resolve_resume(str(tmp_path / "missing"), str(tmp_path), world_size=1)
    with pytest.raises(ConfigError, match="it holds checkpoints; pass one of its step-\\* directories"):
        checkpoint.resolve_resume(str(ckpt), str(tmp_path), world_size=1)
    os.remove(ckpt / "step-00000004" / "complete")
    with pytest.raises(ConfigError, match="no 'complete' manifest"):
        checkpoint.resolve_resume(str(ckpt / "step-00000004"), str(tmp_path), world_size=1)
    # Another data-parallel size is no refusal: resume_layout says how it loads.
    assert checkpoint.resolve_resume("auto", str(tmp_path), world_size=2) == str(ckpt / "step-00000002")
    with pytest.raises(ConfigError) as err:
        checkpoint.resolve_resume(str(tmp_path / "missing"), str(tmp_path), world_size=1)
    assert "\n" not in str(err.value)  # one line


def test_prune_keeps_newest_complete(tmp_path):
    """keep_last=2 over steps 2..8 leaves 6 and 8; keep_last below 1 still keeps the newest; a
    directory without manifest is left alone by prune, .tmp-* only by remove_stale."""
    for step in (2, 4, 6):
        _save(tmp_path, step, keep_last=2)
    assert [s for s, _ in checkpoint.complete_tags(str(tmp_path))] == [4, 6]
    _save(tmp_path, 8, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000006", "step-00000008"]
    os.makedirs(tmp_path / "step-00000010")
    os.makedirs(tmp_path / ".tmp-step-00000012")
    assert checkpoint.prune(str(tmp_path), 0) == [str(tmp_path / "step-00000006")]
    assert sorted(os.listdir(tmp_path)) == [".tmp-step-00000012", "latest", "step-00000008", "step-00000010"]
    assert checkpoint.remove_stale(str(tmp_path)) == [str(tmp_path / ".tmp-step-00000012")]
    assert checkpoint.prune(str(tmp_path), 1) == []


def test_saving_a_step_again_replaces_it(tmp_path):
    """A run resumed from step 4 saves step 6 again although an older step 6 exists."""
    _save(tmp_path, 6, payload=b"old")
    _save(tmp_path, 6, payload=b"newer")
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000006"]
    assert torch.load(tmp_path / "step-00000006" / WEIGHTS, weights_only=True) == b"newer"
    assert checkpoint.problem(str(tmp_path / "step-00000006")) is None


def _draws():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(), random.getrandbits(64))


def test_rng_states_round_trip_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    np.random.randn()  # a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in python's
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def test_trainer_state_continues_the_sampler(tmp_path):
    """The sampler's state through the trainer-state file: the restored sampler hands out exactly
    the batches the original would have (no row repeated, none skipped)."""
    labels = [i % 3 == 0 for i in range(60)]
    a = KTOBatchSampler(labels, global_batch_size=8, seed=5)
    first = [a.next_global_batch() for _ in range(3)]
    fake = FakeEngine()
    state = {"step": 3, "sampler": a.state_dict(), "rng": checkpoint.rng_state(), "eval_history": [[2, {"loss": 0.5}]]}
    path = checkpoint.save(fake, str(tmp_path), 3, state, keep_last=1, dtype="float32")
    rest = [a.next_global_batch() for _ in range(4)]
    b = KTOBatchSampler(labels, global_batch_size=8, seed=5)
    state = checkpoint.load_state(path)
    b.load_state_dict(state["sampler"])
    assert [b.next_global_batch() for _ in range(4)] == rest
    assert state["eval_history"] == [[2, {"loss": 0.5}]]
    assert not set(sum(first, [])) & set(sum(rest, []))  # 56 of 60 rows: one epoch, nothing twice


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_scan_refuses_foreign_globals(tmp_path):
    """Plain tensors and DeepSpeed's LossScaler pass; a pickle that names os.getcwd is refused
    before anything is unpickled, and the weights_only loader used for DeepSpeed's files refuses
    it too."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    ok = tmp_path / "ok"
    ok.mkdir()
    torch.save({"w": torch.ones(2), "scaler": LossScaler(1.0), "n": [1, 2]}, ok / "a_model_states.pt")
    engine.check_deepspeed_pickles(str(ok))
    assert checkpoint_io._weights_only_load(str(ok / "a_model_states.pt"))["n"] == [1, 2]
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"w": torch.ones(2), "x": _Payload()}, bad / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ModelError, match=r"refusing to unpickle \['posix.getcwd'\]"):
        engine.check_deepspeed_pickles(str(bad))
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint_io._weights_only_load(str(bad / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))


def test_resume_at_another_tensor_parallel_size(tmp_path):
    """AutoTP shards are per tp rank: a checkpoint with ZeRO partitions resumes at any tp size and
    number of ranks through its universal form (whole tensors that the target cuts again); one
    without (ZeRO stage 0, its model files one tp rank's shards each) only at the tp size and
    number of ranks that wrote it, and one whose manifest predates tp_size (tp 1) is tp 1; one line
    naming both layouts and the reason."""
    fake = FakeEngine()
    tp2 = checkpoint.save(fake, str(tmp_path / "a" / "checkpoints"), 4, {"step": 4}, keep_last=2, dtype="float32",
                          tp_size=2)
    assert json.loads((tmp_path / "a" / "checkpoints" / "step-00000004" / "complete").read_text())["tp_size"] == 2
    assert checkpoint.resolve_resume("auto", str(tmp_path / "a"), world_size=1, tp_size=2) == tp2
    _manifest_with(tp2, world_size=4)  # as TP2 x DP2 writes it
    with pytest.raises(ConfigError) as err:
        checkpoint.resolve_resume("auto", str(tmp_path / "a"), world_size=4, tp_size=1)
    assert str(err.value) == (f"train.resume=auto: {tp2} was written by 4 ranks as dp 2 × tp 2 × pp 1; this run is "
                              "4 ranks as dp 4 × tp 1 × pp 1: it holds no ZeRO partitions (ZeRO stage 0), so it has "
                              "no universal conversion: resume with parallel.tp_size=2")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:  # TP2 x DP1, ZeRO stage 0 (FakeEngine's files): no universal route
        checkpoint.resolve_resume(tp2, str(tmp_path / "a"), world_size=2, tp_size=2)
    assert str(err.value) == (f"train.resume={tp2}: {tp2} was written by 4 ranks as dp 2 × tp 2 × pp 1; this run is 2 "
                              "ranks as dp 1 × tp 2 × pp 1: it holds no ZeRO partitions (ZeRO stage 0), so it has no "
                              "universal conversion: resume with 4 processes")
    zero = checkpoint.save(FakeEngine(name="zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                           str(tmp_path / "z" / "checkpoints"), 4, {"step": 4}, keep_last=2, dtype="float32", tp_size=2)
    _manifest_with(zero, world_size=4)
    for world in (2, 4, 8):  # TP2 x DP1, DP2 (as saved), DP4: through the universal form but at its own size
        assert checkpoint.resolve_resume(zero, str(tmp_path / "z"), world_size=world, tp_size=2) == zero
        assert checkpoint.resume_layout(zero, world) == ("same" if world == 4 else "convert")
        assert checkpoint.resume_layout(zero, world, tp_size=2) == ("same" if world == 4 else "convert")
    for world, tp in ((1, 1), (2, 1), (4, 1), (4, 4), (8, 4)):  # another tp size, at any number of ranks
        assert checkpoint.resolve_resume(zero, str(tmp_path / "z"), world_size=world, tp_size=tp) == zero
        assert checkpoint.resume_layout(zero, world, tp_size=tp) == "convert"
        assert checkpoint.ranks_moved(zero, world, tp_size=tp)
    _manifest_with(zero, world_size=2, tp_size=1)  # ZeRO-3 DP2 -> TP2 on 2 ranks: same world, another tp
    assert checkpoint.resume_layout(zero, 2) == "same" and checkpoint.resume_layout(zero, 2, tp_size=2) == "convert"
    _manifest_with(zero, format=checkpoint.UNIVERSAL, tp_size=1, source="/x/step-00000004")
    with pytest.raises(ConfigError) as err:  # converted for a run without tensor parallelism: flat ZeRO-3 tensors
        checkpoint.resolve_resume(zero, str(tmp_path / "z"), world_size=2, tp_size=2)
    assert str(err.value) == (f"train.resume={zero}: {zero} was written by 2 ranks as dp 2 × tp 1 × pp 1; this run is 2 "
                              "ranks as dp 1 × tp 2 × pp 1: it was converted for a run without tensor parallelism (flat "
                              "ZeRO-3 tensors, vocabulary blocks): resume from the step-* directory it was converted "
                              "from (/x/step-00000004), which is converted again for this run")
    assert checkpoint.resolve_resume(zero, str(tmp_path / "z"), world_size=1, tp_size=1) == zero
    _manifest_with(zero, format=checkpoint.UNIVERSAL, tp_size=2)  # a universal folder loads at any tp size
    for world, tp in ((1, 1), (2, 2), (4, 4)):
        assert checkpoint.resolve_resume(zero, str(tmp_path / "z"), world_size=world, tp_size=tp) == zero
        assert checkpoint.resume_layout(zero, world, tp_size=tp) == "universal"
    _, old = _save(tmp_path / "b" / "checkpoints", 2)
    manifest_path = os.path.join(old, "complete")
    manifest = json.loads(open(manifest_path).read())
    del manifest["tp_size"]  # written before tensor parallelism existed
    open(manifest_path, "w").write(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"written by 1 rank as dp 1 × tp 1 × pp 1; this run is 2 ranks as dp 1 × "
                                          r"tp 2 × pp 1: "):
        checkpoint.resolve_resume(old, str(tmp_path / "b"), world_size=2, tp_size=2)
    del manifest["world_size"]  # older still: the degrees alone
    open(manifest_path, "w").write(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"written by an unrecorded number of ranks at tp 1 × pp 1; this run is 2 "
                                          r"ranks as dp 1 × tp 2 × pp 1: .*: resume with parallel.tp_size=1$"):
        checkpoint.resolve_resume(old, str(tmp_path / "b"), world_size=2, tp_size=2)


def test_resume_at_another_pipeline_layout(tmp_path):
    """A pipeline checkpoint of ZeRO-1 resumes at another pipeline degree (none included) or
    data-parallel size through its universal form (``convert``); without ZeRO partitions (stage 0:
    Adam's states per stage, or per model) another pipeline layout or number of ranks is refused in
    one line naming both layouts, and so is a ZeRO stage 0 checkpoint under a pipeline."""
    zero1 = FakeEngine(name="zero_pp_rank_0_mp_rank_00_optim_states.pt")
    pp2 = checkpoint.save(zero1, str(tmp_path / "a" / "checkpoints"), 4, {"step": 4}, keep_last=2, dtype="float32",
                          pp_size=2)
    assert json.loads((tmp_path / "a" / "checkpoints" / "step-00000004" / "complete").read_text())["pp_size"] == 2
    _manifest_with(pp2, world_size=2)  # as PP2 on 2 ranks writes it
    for world, pp in ((2, 1), (4, 2), (2, 2), (4, 1)):
        assert checkpoint.resolve_resume("auto", str(tmp_path / "a"), world_size=world, pp_size=pp) == pp2
        assert checkpoint.resume_layout(pp2, world, pp_size=pp) == ("same" if (world, pp) == (2, 2) else "convert")
        assert checkpoint.ranks_moved(pp2, world, pp_size=pp) == ((world, pp) != (2, 2))
    stage0 = checkpoint.save(FakeEngine(), str(tmp_path / "s" / "checkpoints"), 4, {"step": 4}, keep_last=2,
                             dtype="float32", pp_size=2)
    _manifest_with(stage0, world_size=2)
    with pytest.raises(ConfigError) as err:
        checkpoint.resolve_resume("auto", str(tmp_path / "s"), world_size=2)
    assert str(err.value) == (f"train.resume=auto: {stage0} was written by 2 ranks as dp 1 × tp 1 × pp 2; this run "
                              "is 2 ranks as dp 2 × tp 1 × pp 1: it holds no ZeRO partitions (ZeRO stage 0), so its "
                              "Adam states do not move to another pipeline layout: resume with parallel.pp_size=2")
    with pytest.raises(ConfigError, match=r"dp 2 × tp 1 × pp 2: it holds no ZeRO partitions \(ZeRO stage 0\), so it "
                                          r"has no universal conversion: resume with 2 processes$"):
        checkpoint.resolve_resume("auto", str(tmp_path / "s"), world_size=4, pp_size=2)
    _, old = _save(tmp_path / "b" / "checkpoints", 2)
    manifest_path = os.path.join(old, "complete")
    manifest = json.loads(open(manifest_path).read())
    del manifest["pp_size"]  # written before pipelines existed
    open(manifest_path, "w").write(json.dumps(manifest))
    with pytest.raises(ConfigError) as err:
        checkpoint.resolve_resume(old, str(tmp_path / "b"), world_size=2, pp_size=2)
    assert str(err.value) == (f"train.resume={old}: {old} was written by 1 rank as dp 1 × tp 1 × pp 1; this run is "
                              "2 ranks as dp 1 × tp 1 × pp 2: it holds no ZeRO partitions (ZeRO stage 0), so its "
                              "Adam states do not move to another pipeline layout: resume with parallel.pp_size=1")


def test_a_universal_folder_resumes_only_under_its_layer_names(tmp_path):
    """A universal folder records whether its parameters are under a pipeline's names or the
    model's; a run of the other kind is told to resume from the step-* it came from."""
    path = checkpoint.save(FakeEngine(), str(tmp_path / "checkpoints"), 4, {"step": 4}, keep_last=2, dtype="float32")
    for names, pp in (("pipeline", 2), ("hf", 1)):
        _manifest_with(path, world_size=2, format="universal", layer_names=names)
        assert checkpoint.resolve_resume(path, str(tmp_path), world_size=2, pp_size=pp) == path
        assert checkpoint.resume_layout(path, 2, pp_size=pp) == "universal"
    with pytest.raises(ConfigError, match=r"this run is 2 ranks as dp 2 × tp 1 × pp 1: its universal form is under "
                                          r"pipeline parameter names, for a pipeline: resume from the step-\* directory "
                                          r"it was converted from, which is converted again for this run$"):
        _manifest_with(path, layer_names="pipeline")
        checkpoint.resolve_resume(path, str(tmp_path), world_size=2)


def _manifest_with(path, **changes):
    manifest_path = os.path.join(path, checkpoint.MANIFEST)
    manifest = {**json.loads(open(manifest_path).read()), **changes}
    open(manifest_path, "w").write(json.dumps(manifest))


def test_resume_layout(tmp_path):
    """How a checkpoint loads at a world size: its own files at the size that wrote it, or when they
    hold no per-rank partitions (ZeRO stage 0); a universal conversion first when ZeRO optimizer
    partitions were cut for another size; a universal checkpoint directly at any size."""
    _, path = _save(tmp_path, 2)
    assert checkpoint.resume_layout(path, 1) == "same"
    assert checkpoint.resume_layout(path, 4) == "same"  # only model states: stage 0, not per rank
    assert not checkpoint.ranks_moved(path, 1) and checkpoint.ranks_moved(path, 4)  # trainer states are per rank
    _manifest_with(path, world_size=4, files={"zero_pp_rank_0_mp_rank_00_optim_states.pt": 1})
    assert checkpoint.resume_layout(path, 4) == "same"
    assert checkpoint.resume_layout(path, 2) == "convert"
    _manifest_with(path, format=checkpoint.UNIVERSAL)
    assert checkpoint.resume_layout(path, 4) == checkpoint.resume_layout(path, 1) == "universal"
    assert checkpoint.ranks_moved(path, 4)  # its trainer states are the source's first ranks'


def test_derived_rng_state_depends_on_seed_step_and_rank():
    """At another number of ranks each rank's generators are seeded from (seed, step, rank): the
    same numbers in every run (sha256, not the salted hash), different ones per rank and step."""
    def draw(seed, step, rank):
        checkpoint.derive_rng_state(seed, step, rank)
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    assert draw(0, 4, 1) == draw(0, 4, 1)
    assert len({draw(0, 4, 0), draw(0, 4, 1), draw(0, 5, 0), draw(1, 4, 0)}) == 4


def test_resume_at_another_sequence_parallel_layout_is_refused(tmp_path):
    """The manifest records sp_size; a sequence-parallel checkpoint resumes only at the same sp_size
    and world (another sp regroups which ranks hold which rows), and an sp 1 checkpoint (or one
    from before sp_size was recorded) does not resume under sequence parallelism."""
    fake = FakeEngine()
    sp2 = checkpoint.save(fake, str(tmp_path / "a" / "checkpoints"), 4, {"step": 4}, keep_last=2, dtype="float32",
                          sp_size=2)
    assert json.loads((tmp_path / "a" / "checkpoints" / "step-00000004" / "complete").read_text())["sp_size"] == 2
    assert checkpoint.resolve_resume("auto", str(tmp_path / "a"), world_size=1, sp_size=2) == sp2
    _manifest_with(sp2, world_size=2)  # as SP2 on 2 ranks writes it
    with pytest.raises(ConfigError) as err:
        checkpoint.resolve_resume("auto", str(tmp_path / "a"), world_size=2)
    assert str(err.value) == (f"train.resume=auto: {sp2} was written by 2 ranks as dp 1 × tp 1 × pp 1 × sp 2; this "
                              "run is 2 ranks as dp 2 × tp 1 × pp 1: another sequence-parallel size, or another "
                              "number of ranks under sequence parallelism, is not supported: resume with 2 processes "
                              "and parallel.sp_size=2")
    with pytest.raises(ConfigError, match=r"written by 2 ranks as dp 1 × tp 1 × pp 1 × sp 2; this run is 4 ranks as "
                                          r"dp 2 × tp 1 × pp 1 × sp 2: "):
        checkpoint.resolve_resume("auto", str(tmp_path / "a"), world_size=4, sp_size=2)
    _, old = _save(tmp_path / "b" / "checkpoints", 2)
    _manifest_with(old, sp_size=1)
    manifest_path = os.path.join(old, checkpoint.MANIFEST)
    manifest = json.loads(open(manifest_path).read())
    del manifest["sp_size"]  # written before sequence parallelism existed
    open(manifest_path, "w").write(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"written by 1 rank as dp 1 × tp 1 × pp 1; this run is 2 ranks as dp 1 × "
                                          r"tp 1 × pp 1 × sp 2: another sequence-parallel size"):
        checkpoint.resolve_resume(old, str(tmp_path / "b"), world_size=2, sp_size=2)


def test_resume_at_another_expert_parallel_layout(tmp_path):
    """The manifest records ep_size. An expert-parallel checkpoint of ZeRO partitions resumes at
    another ep_size or world through its universal form (never loaded as it is: DeepSpeed loads
    another autoep_size silently and corrupts the experts' optimizer state at the next step); a
    ZeRO-0 one, an ep 1 checkpoint under expert parallelism, and a universal form whose expert
    names are for the other kind of run are refused in one line."""
    root = tmp_path / "a"
    optim = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    ep2 = checkpoint.save(FakeEngine(name=optim), str(root / "checkpoints"), 4, {"step": 4}, keep_last=2,
                          dtype="float32", ep_size=2)
    assert checkpoint.read_manifest(ep2)["ep_size"] == 2
    for world, ep, layout in ((1, 2, "same"), (2, 2, "convert"), (1, 1, "convert"), (2, 1, "convert")):
        assert checkpoint.resolve_resume(ep2, str(root), world_size=world, ep_size=ep) == ep2
        assert checkpoint.resume_layout(ep2, world, ep) == layout
        assert checkpoint.ranks_moved(ep2, world, ep) == (layout != "same")

    zero0 = checkpoint.save(FakeEngine(), str(tmp_path / "z" / "checkpoints"), 4, {"step": 4}, keep_last=2,
                            dtype="float32", ep_size=2)
    assert checkpoint.resolve_resume(zero0, str(tmp_path / "z"), world_size=1, ep_size=2) == zero0
    with pytest.raises(ConfigError) as err:
        checkpoint.resolve_resume(zero0, str(tmp_path / "z"), world_size=2, ep_size=2)
    assert str(err.value) == (f"train.resume={zero0}: {zero0} was written by 1 rank as dp 1 × tp 1 × pp 1 (experts "
                              "over ep 2); this run is 2 ranks as dp 2 × tp 1 × pp 1 (experts over ep 2): it holds no "
                              "ZeRO partitions (ZeRO stage 0) and so has no universal conversion: resume with 1 "
                              "processes and parallel.ep_size=2")

    ep1 = checkpoint.save(FakeEngine(name=optim), str(tmp_path / "b" / "checkpoints"), 2, {"step": 2}, keep_last=2,
                          dtype="float32")
    with pytest.raises(ConfigError, match=r"written by 1 rank as dp 1 × tp 1 × pp 1; this run is 2 ranks as dp 2 × "
                                          r"tp 1 × pp 1 \(experts over ep 2\): a checkpoint without expert parallelism "
                                          r"does not resume under it"):
        checkpoint.resolve_resume(ep1, str(tmp_path / "b"), world_size=2, ep_size=2)

    for names, ep in (("hf", 2), ("autoep", 1)):  # a universal form (FakeEngine's: no zero/ inside)
        form = str(tmp_path / names / "checkpoints" / "universal-step-00000004")
        os.makedirs(form + ".tmp")
        checkpoint.commit(form + ".tmp", form, step=4, world_size=2, dtype="float32", digests={}, ep_size=2,
                          extra={"format": checkpoint.UNIVERSAL, "expert_names": names})
        with pytest.raises(ConfigError, match=f"its experts are under {names} names, for "
                                              + ("no " if ep > 1 else "") + "expert parallelism: resume from the "
                                              "step-\\* directory it was converted from"):
            checkpoint.resolve_resume(form, str(tmp_path / names), world_size=2, ep_size=ep)
