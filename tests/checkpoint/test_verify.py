"""What resume verifies before it loads anything, without a process group: every file's sha256
against the manifest (damage that keeps a file's size), the pickle allow-list (DeepSpeed's ZeRO
1/2/3 classes pass, anything else is refused), what ``resume: auto`` does with a damaged newest
checkpoint, old manifests without checksums, and one-line errors for unreadable files."""

import json
import os

import pytest
import torch

from megakto import checkpoint
from megakto.checkpoint import manifest as manifest_module
from megakto.distributed import engine
from megakto.distributed._deepspeed import checkpoint_io
from megakto.errors import ConfigError, ModelError
from tests.checkpoint.test_checkpoint import WEIGHTS, FakeEngine, _save


def _damage(path, offset=64, n=4096):
    """Overwrite ``n`` bytes in place with garbage: the size stays the same."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(min(offset, max(0, size - n)))
        f.write(b"\xa5" * min(n, size))
    assert os.path.getsize(path) == size


def _warnings():
    seen = []
    return seen, seen.append


def test_manifest_records_each_files_sha256(tmp_path):
    _, path = _save(tmp_path, 2, payload=os.urandom(20000))
    manifest = checkpoint.read_manifest(path)
    assert sorted(manifest["sha256"]) == sorted(manifest["files"]) == ["trainer_state_rank0.pt", WEIGHTS]
    for name, digest in manifest["sha256"].items():
        assert digest == checkpoint.file_digest(os.path.join(path, name)) and len(digest) == 64
    assert checkpoint.verify(path) is None


def test_same_size_damage_is_caught(tmp_path):
    """4 KB of garbage inside the weights keeps the size (the old size check passes) but fails the
    checksum; an explicit train.resume refuses it in one line that names the file."""
    ckpt = tmp_path / "checkpoints"
    _, path = _save(ckpt, 4, payload=os.urandom(20000))
    _damage(os.path.join(path, WEIGHTS))
    assert checkpoint.problem(path) is None  # sizes alone do not see it
    assert checkpoint.verify(path) == f"{WEIGHTS} does not match its sha256 in the manifest (damaged after the save)"
    with pytest.raises(ConfigError) as err:
        checkpoint.resolve_resume(path, str(tmp_path), world_size=1)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"train.resume={path}: not a loadable checkpoint: {WEIGHTS} "
                                                      "does not match its sha256")


def test_auto_skips_a_damaged_newest_with_a_warning(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4):
        _save(ckpt, step, payload=os.urandom(20000))
    _damage(ckpt / "step-00000004" / "trainer_state_rank0.pt")
    seen, warn = _warnings()
    assert checkpoint.resolve_resume("auto", str(tmp_path), world_size=1, warn=warn) == str(ckpt / "step-00000002")
    assert seen == [f"train.resume=auto: skipping {ckpt / 'step-00000004'}: trainer_state_rank0.pt does not match "
                    "its sha256 in the manifest (damaged after the save)"]
    # Nothing passes: the run stops rather than silently starting over.
    _damage(ckpt / "step-00000002" / WEIGHTS)
    seen, warn = _warnings()
    with pytest.raises(ConfigError, match=r"^train.resume=auto: no checkpoint in \S+ passes verification: "
                                          r"step-00000004 \(trainer_state_rank0.pt .*\); step-00000002 \("
                                          r".*set train.resume=none to start over$"):
        checkpoint.resolve_resume("auto", str(tmp_path), world_size=1, warn=warn)
    assert len(seen) == 2


def test_default_warning_goes_to_stderr(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4):
        _save(ckpt, step, payload=os.urandom(20000))
    _damage(ckpt / "step-00000004" / WEIGHTS)
    assert checkpoint.resolve_resume("auto", str(tmp_path), world_size=1) == str(ckpt / "step-00000002")
    err = capsys.readouterr().err
    assert err == f"megakto: warning: train.resume=auto: skipping {ckpt / 'step-00000004'}: {WEIGHTS} does not match " \
                  "its sha256 in the manifest (damaged after the save)\n"


def test_old_manifest_without_checksums_is_accepted_on_sizes(tmp_path):
    """A manifest written before checksums existed: sizes and the pickle scan are checked, and a
    warning says so; a file that is not a torch file at all is still refused."""
    ckpt = tmp_path / "checkpoints"
    _, path = _save(ckpt, 2)
    manifest_path = os.path.join(path, checkpoint.MANIFEST)
    manifest = json.loads(open(manifest_path).read())
    del manifest["sha256"]
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    seen, warn = _warnings()
    assert checkpoint.resolve_resume("auto", str(tmp_path), world_size=1, warn=warn) == path
    assert seen == [f"{path}: its manifest has no checksums (saved before they were recorded); only file sizes and "
                    "pickles were checked"]
    _damage(os.path.join(path, WEIGHTS), offset=0, n=os.path.getsize(os.path.join(path, WEIGHTS)))
    why = checkpoint.verify(path)
    assert why.startswith(f"{WEIGHTS}: not a readable torch checkpoint file (")


def _fragment_state():
    """What a ZeRO-1/2 optimizer file holds: param_slice_mappings of fragment_address."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return {"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
                                     "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]},
            "w": torch.ones(4)}


def test_zero2_classes_are_allowed(tmp_path):
    """fragment_address is in every ZeRO-1/2 optimizer file: the scan and the weights_only loader
    that resume and export use accept it."""
    torch.save(_fragment_state(), tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    engine.check_deepspeed_pickles(str(tmp_path))
    loaded = checkpoint_io._weights_only_load(str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert loaded["optimizer_state_dict"]["param_slice_mappings"][0]["w"].numel == 4


class _Foreign:
    """A class that is neither torch's nor DeepSpeed's checkpoint classes."""

    def __init__(self):
        self.x = 1


def test_foreign_class_is_still_refused(tmp_path):
    state = _fragment_state()
    state["extra"] = _Foreign()
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"refusing to unpickle \['tests.checkpoint.test_verify._Foreign'\]"):
        engine.check_deepspeed_pickles(str(tmp_path))
    with pytest.raises(ModelError) as err:
        checkpoint_io._weights_only_load(str(path))
    assert str(err.value) == (f"{path}: Weights only load failed: refusing to unpickle "
                              "['tests.checkpoint.test_verify._Foreign']: a checkpoint holds tensors, plain types "
                              "and DeepSpeed's own classes only")


def test_unreadable_trainer_state_is_one_line(tmp_path):
    """A damaged trainer_state_rank0.pt, or one pickling a foreign class, is a ConfigError naming
    the file (not PytorchStreamReader / UnpicklingError)."""
    _, path = _save(tmp_path, 2)
    state = os.path.join(path, "trainer_state_rank0.pt")
    torch.save({"version": 1, "rank": 0, "x": _Foreign()}, state)
    with pytest.raises(ConfigError) as err:
        checkpoint.load_state(path)
    assert str(err.value) == (f"train.resume: {state}: Weights only load failed: refusing to unpickle "
                              "['tests.checkpoint.test_verify._Foreign']: a checkpoint holds tensors, plain types "
                              "and DeepSpeed's own classes only")
    with open(state, "wb") as f:
        f.write(b"PK\x03\x04" + os.urandom(300))
    with pytest.raises(ConfigError) as err:
        checkpoint.load_state(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"train.resume: {state}: Weights only load failed: "
                                                      "not a readable torch checkpoint file (")
    torch.save([1, 2], state)  # plain types: loads, but is not a trainer state
    with pytest.raises(ConfigError, match="is not rank 0's trainer state"):
        checkpoint.load_state(path)


def test_other_world_size_of_a_pipeline_is_refused_before_any_file_is_hashed(tmp_path, monkeypatch):
    """A ZeRO stage 0 pipeline checkpoint of 1 rank resumed by 4 (no partitions to convert): one
    line with both numbers, and no file is read for its checksum first (a large checkpoint would be
    hashed whole for nothing)."""
    path = checkpoint.save(FakeEngine(os.urandom(20000)), str(tmp_path / "checkpoints"), 2, {"step": 2},
                           keep_last=2, dtype="float32", pp_size=2)
    hashed = []
    monkeypatch.setattr(manifest_module, "file_digest", lambda p: hashed.append(p) or "0" * 64)
    for resume in (path, "auto"):
        with pytest.raises(ConfigError) as err:
            checkpoint.resolve_resume(resume, str(tmp_path), world_size=4, pp_size=2)
        assert str(err.value) == (f"train.resume={resume}: {path} was written by 1 rank at tp 1 × pp 2; this run is "
                                  "4 ranks as dp 2 × tp 1 × pp 2: it holds no ZeRO partitions (ZeRO stage 0), so it "
                                  "has no universal conversion: resume with 1 processes")
    assert hashed == []


def test_hash_shares_balance_bytes():
    """Largest first to the lightest rank: a(10) -> 0, b(9) -> 1, c(8) -> 1 (9 < 10), d(1) -> 0
    (10 < 17): 11 and 17 bytes, where dealing round robin would give 18 and 10."""
    assert checkpoint.hash_shares({"d": 1, "c": 8, "b": 9, "a": 10}, 2) == [["a", "d"], ["b", "c"]]
    assert checkpoint.hash_shares({"x": 5, "y": 5}, 1) == [["x", "y"]]
    assert checkpoint.hash_shares({"x": 5}, 3) == [["x"], [], []]


def test_a_manifest_of_the_wrong_shape_is_no_manifest(tmp_path):
    """A hand-edited manifest whose checksums are not a mapping is refused in one line, not a
    TypeError halfway through verification."""
    _, path = _save(tmp_path / "checkpoints", 2, payload=os.urandom(2000))
    manifest_path = os.path.join(path, checkpoint.MANIFEST)
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["sha256"] = ["not", "a", "mapping"]
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    assert checkpoint.read_manifest(path) is None
    assert checkpoint.verify(path) == "no 'complete' manifest (the save did not finish)"
