"""megakto.checkpoint.universal without DeepSpeed's converter: which universal folder a resume may reuse, what
pruning and saving again delete, and the export's reading of ``zero/<param>/fp32.pt``. The
conversion itself (``engine.to_universal``) is replaced by a fake that writes one parameter's
file, so every other line of ``universal.convert`` runs; tests/e2e/test_universal_resume.py runs
the real one."""

import json
import os

import pytest
import torch

from megakto import checkpoint
from megakto.checkpoint import universal
from megakto.checkpoint.weights import universal_weights
from megakto.errors import ModelError
from tests.checkpoint.test_checkpoint import FakeEngine

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _save(ckpt_dir, step, payload, keep_last=10):
    return checkpoint.save(FakeEngine(payload, name=OPTIM), str(ckpt_dir), step, {"step": step, "sampler": {}},
                           keep_last=keep_last, dtype="float32")


@pytest.fixture
def fake_converter(monkeypatch):
    """``engine.to_universal`` writing the source's optimizer payload as one parameter's fp32."""
    calls = []

    def to_universal(tag_dir, out_dir, workers=1, **stages):
        calls.append(tag_dir)
        os.makedirs(os.path.join(out_dir, "zero", "w"))
        payload = torch.load(os.path.join(tag_dir, OPTIM), weights_only=True)
        torch.save({"param": torch.tensor([float(payload)])}, os.path.join(out_dir, "zero", "w", "fp32.pt"))
        torch.save(torch.tensor(1.0), os.path.join(out_dir, "zero", "w", "step.pt"))
        torch.save({"param_groups": []}, os.path.join(out_dir, "zero", "optimizer_state.pt"))

    monkeypatch.setattr(universal.engine, "to_universal", to_universal)
    return calls


def _optimizer_state(out_dir):
    """What ds_to_universal writes beside the parameters: Adam's step for each, its global state."""
    zero = os.path.join(out_dir, "zero")
    for name in os.listdir(zero):
        torch.save(torch.tensor(1.0), os.path.join(zero, name, "step.pt"))
    torch.save({"param_groups": []}, os.path.join(zero, "optimizer_state.pt"))


def _weight(out):
    return float(torch.load(os.path.join(out, "zero", "w", "fp32.pt"), weights_only=True)["param"])


def test_a_step_saved_again_is_converted_again(tmp_path, fake_converter):
    """Resume step-8 at another size (universal-step-8 made), roll back and save step-8 again,
    resume at another size again: the universal folder of the first save must not be reused (its
    weights and Adam moments beside the new save's sampler state). The source is identified by its
    manifest's checksum; a universal folder made elsewhere (so nothing deletes it) is reconverted."""
    ckpt = tmp_path / "checkpoints"
    tag = _save(ckpt, 8, 1)
    out = str(tmp_path / "elsewhere" / "universal-step-00000008")
    assert not universal.converted(tag, out)
    universal.convert(tag, out)
    assert universal.converted(tag, out) and _weight(out) == 1.0
    assert universal.convert(tag, out) == out and len(fake_converter) == 1  # the same save: reused

    _save(ckpt, 8, 2)  # the rolled-back run saves step 8 again
    assert not universal.converted(tag, out)
    universal.convert(tag, out)
    assert len(fake_converter) == 2 and _weight(out) == 2.0 and universal.converted(tag, out)
    _save(ckpt, 8, 3)
    assert universal.stale(tag, out) == "converted from an earlier save of step-00000008"  # what the trainer logs
    assert universal.stale(str(tmp_path / "other" / "step-00000008"), out).startswith("converted from /")


def test_pruning_or_saving_a_step_again_deletes_its_universal_form(tmp_path, fake_converter):
    """universal-<tag> beside its source goes when the source is pruned or saved again (12 bytes a
    parameter each); one converted from another run's tag stays."""
    ckpt = tmp_path / "checkpoints"
    tag4, tag8 = _save(ckpt, 4, 1), _save(ckpt, 8, 1)
    universal.convert(tag8, universal.universal_dir(tag8))
    _save(ckpt, 8, 2)
    assert not os.path.exists(ckpt / "universal-step-00000008")

    universal.convert(tag4, universal.universal_dir(tag4))
    foreign = _save(tmp_path / "other", 12, 3)
    universal.convert(foreign, universal.universal_dir(foreign, str(ckpt)))  # a resume of another run's tag
    assert os.path.isdir(ckpt / "universal-step-00000004")
    _save(ckpt, 16, 4, keep_last=2)  # prunes step 4
    assert sorted(os.listdir(ckpt)) == ["latest", "step-00000008", "step-00000016", "universal-step-00000012"]
    assert universal.converted(foreign, str(ckpt / "universal-step-00000012"))


def _universal_folder(path, params, state):
    """A universal folder's ``zero/<name>/fp32.pt`` files and trainer state, no manifest (the export
    reads the files)."""
    for name, value in params.items():
        os.makedirs(path / "zero" / name)
        torch.save(value, path / "zero" / name / "fp32.pt")
    torch.save({"version": checkpoint.STATE_VERSION, "rank": 0, **state}, path / checkpoint.state_file(0))
    return str(path)


def test_flat_zero3_tensors_need_their_shapes(tmp_path):
    """ZeRO-3's converter writes each parameter as a flat tensor; the trainer state's param_shapes
    give it its shape back. A universal folder of a checkpoint saved before shapes were recorded
    cannot be exported: one line naming the parameter, never a flat (16,) matrix. ZeRO-1/2 files
    are {"param": tensor} in their own shapes and need none."""
    flat = {"m.weight": torch.arange(16.0), "norm.weight": torch.ones(4)}
    shaped = universal_weights(_universal_folder(tmp_path / "a", flat, {
        "param_shapes": {"m.weight": [4, 4], "norm.weight": [4]}}))
    assert shaped["m.weight"].shape == (4, 4) and shaped["norm.weight"].shape == (4,)
    with pytest.raises(ModelError, match=r"fp32.pt: a flat ZeRO-3 tensor and no shape for m.weight in the trainer "
                                         r"state"):
        universal_weights(_universal_folder(tmp_path / "b", flat, {}))
    zero12 = {"m.weight": {"param": torch.zeros(4, 4)}, "norm.weight": {"param": torch.ones(4)}}
    got = universal_weights(_universal_folder(tmp_path / "c", zero12, {}))
    assert got["m.weight"].shape == (4, 4) and got["norm.weight"].shape == (4,)


def test_a_schedule_saved_with_more_parameter_groups_loads_if_they_agree():
    """An expert-parallel run's LR schedule (AutoEP's experts in groups of their own: 3 here) loads
    into a run with 2 groups through a universal checkpoint when every group's state is the same;
    groups that differ are left to torch, which refuses them."""
    from functools import partial

    from megakto.distributed._deepspeed.checkpoint_io import _per_group_fitted
    from megakto.optim import lr_multiplier

    def scheduler(groups):
        optimizer = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)], lr=0.1)
        multiplier = partial(lr_multiplier, warmup_steps=4, max_steps=8, schedule="cosine", min_lr_ratio=0.0)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)

    saved = scheduler(3)
    for _ in range(2):  # warm-up: the third step's lr is 3/4 of the peak
        saved.optimizer.step()
        saved.step()
    two = scheduler(2)
    _per_group_fitted(two)(saved.state_dict())
    assert two.last_epoch == 2 and two.get_last_lr() == saved.get_last_lr()[:2] == [0.1 * 3 / 4] * 2
    state = saved.state_dict()
    state["base_lrs"] = [0.1, 0.2, 0.1]
    with pytest.raises(IndexError):
        _per_group_fitted(scheduler(2))(state)


def test_flat_zero3_tensors_are_shaped_for_tensor_parallelism(tmp_path, monkeypatch):
    """ZeRO-3 without tensor parallelism converts to flat tensors, which deepspeed 0.19.8's ZeRO-3
    loader partitions whole over the data-parallel ranks instead of cutting this rank's AutoTP
    shard: a conversion for a tensor-parallel run rewrites each as ``{"param": tensor}`` in its
    recorded whole shape (weights and both Adam moments), leaves dicts and unrecorded names alone,
    and marks the folder; one for a run without tensor parallelism leaves them flat (rewriting
    every file costs), and neither is reused for the other kind of run."""
    w, m = torch.arange(6.0), torch.arange(6.0) + 10

    def to_universal(tag_dir, out_dir, workers=1, **stages):
        for name, tensor in (("a.weight", w), ("b.weight", m)):
            os.makedirs(os.path.join(out_dir, "zero", name))
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                torch.save(tensor, os.path.join(out_dir, "zero", name, f"{key}.pt"))
        torch.save({"param": w.view(2, 3)}, os.path.join(out_dir, "zero", "a.weight", "fp32.pt"))
        _optimizer_state(out_dir)

    monkeypatch.setattr(universal.engine, "to_universal", to_universal)
    tag = checkpoint.save(FakeEngine(1, name=OPTIM), str(tmp_path / "checkpoints"), 4,
                          {"step": 4, "sampler": {}, "param_shapes": {"a.weight": [2, 3], "c.weight": [6]}},
                          keep_last=10, dtype="float32")
    flat = universal.convert(tag, str(tmp_path / "flat" / "universal-step-00000004"))
    assert torch.equal(torch.load(os.path.join(flat, "zero", "a.weight", "exp_avg.pt"), weights_only=True), w)
    assert universal.stale(tag, flat, for_tp=True) == "converted for a run without tensor parallelism"
    out = universal.convert(tag, str(tmp_path / "universal-step-00000004"), for_tp=True)
    zero = os.path.join(out, "zero")
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        got = torch.load(os.path.join(zero, "a.weight", f"{key}.pt"), weights_only=True)
        assert torch.equal(got["param"], w.view(2, 3))
        assert torch.equal(torch.load(os.path.join(zero, "b.weight", f"{key}.pt"), weights_only=True), m)  # no shape
    assert checkpoint.read_manifest(out)["for_tensor_parallel"] is True and universal.converted(tag, out, for_tp=True)
    assert universal.stale(tag, out) == "converted for a run with tensor parallelism"


def test_vocabulary_blocks_are_joined_for_tensor_parallelism(tmp_path, monkeypatch):
    """A data-parallel run's vocabulary blocks (``<m>.vocab_blocks.<k>.weight``, ZeRO-3's flat files)
    joined into the Hugging Face tensor for a tensor-parallel run: weights and both Adam moments,
    in block order; the folder is not reused for a run without tensor parallelism."""
    blocks = {"model.embed_tokens.vocab_blocks.0.weight": torch.arange(6.0).view(2, 3),
              "model.embed_tokens.vocab_blocks.1.weight": torch.arange(6.0, 9.0).view(1, 3)}

    def to_universal(tag_dir, out_dir, workers=1, **stages):
        for name, tensor in blocks.items():
            os.makedirs(os.path.join(out_dir, "zero", name))
            for i, key in enumerate(("fp32", "exp_avg", "exp_avg_sq")):
                torch.save(tensor.flatten() + 100 * i, os.path.join(out_dir, "zero", name, f"{key}.pt"))
        _optimizer_state(out_dir)

    monkeypatch.setattr(universal.engine, "to_universal", to_universal)
    tag = checkpoint.save(FakeEngine(1, name=OPTIM), str(tmp_path / "checkpoints"), 4,
                          {"step": 4, "sampler": {}, "vocab_layout": [2, 1],
                           "param_shapes": {name: list(t.shape) for name, t in blocks.items()}},
                          keep_last=10, dtype="float32")
    out = universal.convert(tag, str(tmp_path / "universal-step-00000004"), for_tp=True)
    zero = os.path.join(out, "zero")
    assert [n for n in os.listdir(zero) if os.path.isdir(os.path.join(zero, n))] == ["model.embed_tokens.weight"]
    for i, key in enumerate(("fp32", "exp_avg", "exp_avg_sq")):
        got = torch.load(os.path.join(zero, "model.embed_tokens.weight", f"{key}.pt"), weights_only=True)["param"]
        assert torch.equal(got, torch.arange(9.0).view(3, 3) + 100 * i)
    assert universal.converted(tag, out, for_tp=True) and not universal.converted(tag, out)


def test_every_file_of_a_universal_folder_is_checksummed_and_a_damaged_one_fails_verification(tmp_path,
                                                                                              fake_converter):
    """The universal folder's manifest holds the sha256 of every file it lists (taken as each stage
    finished), and the resume's verification names a file damaged after the conversion."""
    tag = _save(tmp_path / "checkpoints", 4, 7)
    out = universal.convert(tag, universal.universal_dir(tag))
    manifest = checkpoint.read_manifest(out)
    assert sorted(manifest[checkpoint.DIGEST]) == sorted(manifest["files"]) == sorted(
        ["trainer_state_rank0.pt", os.path.join("zero", "optimizer_state.pt"), os.path.join("zero", "w", "fp32.pt"),
         os.path.join("zero", "w", "step.pt")])
    for name, digest in manifest[checkpoint.DIGEST].items():
        assert checkpoint.file_digest(os.path.join(out, name)) == digest, name
    assert checkpoint.verify(out, collective=False) is None
    path = os.path.join(out, "zero", "w", "fp32.pt")
    data = bytearray(open(path, "rb").read())
    data[-30] ^= 1  # same size: only the checksum can tell
    open(path, "wb").write(bytes(data))
    assert checkpoint.verify(out, collective=False) == (
        f"zero{os.sep}w{os.sep}fp32.pt does not match its sha256 in the manifest (damaged after the save)")


def _files(folder):
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names if n != checkpoint.MANIFEST}


def test_a_conversion_killed_after_a_stage_continues_from_it(tmp_path, fake_converter, monkeypatch):
    """Killed right after a stage (the test hook exits where a SIGKILL could land), the conversion
    commits nothing; run again it reuses the finished stages (DeepSpeed's converter is not called
    again), says so, and writes the bytes an uninterrupted conversion writes, checksums included. A
    record of another save is not reused."""
    from megakto.checkpoint import _stages

    tag = _save(tmp_path / "checkpoints", 4, 5)
    whole = universal.convert(tag, str(tmp_path / "whole" / "universal-step-00000004"))

    def killed(code):
        raise SystemExit(code)

    out = universal.universal_dir(tag)
    work = os.path.join(os.path.dirname(out), checkpoint.TMP_PREFIX + os.path.basename(out))
    monkeypatch.setattr(_stages.os, "_exit", killed)
    monkeypatch.setenv(_stages.FAULT_ENV, "frozen")
    with pytest.raises(SystemExit):
        universal.convert(tag, out)
    monkeypatch.delenv(_stages.FAULT_ENV)
    assert not os.path.exists(out) and len(fake_converter) == 2
    with open(os.path.join(work, _stages.RECORD)) as f:
        assert json.load(f)["done"] == ["zero", "frozen"]
    logged = []
    universal.convert(tag, out, log=logged.append)
    assert len(fake_converter) == 2 and not os.path.exists(work)  # the converter's stage was not redone
    assert logged == [f"continuing the conversion of {tag} after its finished stages (zero, frozen)"]
    assert _files(out) == _files(whole)
    assert checkpoint.read_manifest(out)[checkpoint.DIGEST] == checkpoint.read_manifest(whole)[checkpoint.DIGEST]

    monkeypatch.setenv(_stages.FAULT_ENV, "zero")
    with pytest.raises(SystemExit):
        universal.convert(tag, str(tmp_path / "again" / "universal-step-00000004"))
    monkeypatch.delenv(_stages.FAULT_ENV)
    _save(tmp_path / "checkpoints", 4, 6)  # the step saved again: the record is of another save
    universal.convert(tag, str(tmp_path / "again" / "universal-step-00000004"))
    assert len(fake_converter) == 4 and _weight(str(tmp_path / "again" / "universal-step-00000004")) == 6.0
