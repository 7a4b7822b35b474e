"""Crash and resume under the real launcher, 2 CPU processes, ZeRO-3, fp32.

One uninterrupted 8-step run is the reference (embedding and head split into vocabulary blocks). The interrupted one goes through both kinds of
crash, each followed by ``train.resume=auto`` (checkpoints every 2 steps, cosine schedule with
warm-up so the LR schedule must round-trip too):

    run A  steps 1-6; rank 0 exits (MEGAKTO_FAULT_EXIT_IN_SAVE=6) after every rank wrote step 6's
           files but before the commit -> step 4 is the newest complete checkpoint
    run B  resumes at step 4, runs 5-6, saves step 6, then both ranks stop before step 7 and rank
           1 gets SIGKILL (the launcher ends rank 0)
    run C  resumes at step 6, runs 7-8

Steps 5-8 must give the reference's losses exactly, the rows consumed (1-4 from A, 5-6 from B,
7-8 from C) must be the reference's, and the final weights must be bitwise equal, and so must the
loss curve TensorBoard shows. The reference run also exports its final checkpoint
(train.export_hf) and keeps the newest two checkpoints. Both report steps 3 and 5 as skipped
(run_trainer.py --count-as-skipped), so the skipped-step count and the health monitor's window C
ends with must be the reference's: carried through two resumes, not restarted.

ZeRO-1 and ZeRO-2 (whose optimizer files pickle another DeepSpeed class) get a shorter pair: a
4-step run crashes inside its final save, the next resumes at step 2, finishes, and exports.
A copy of the reference's checkpoints with same-size damage checks what resume verifies.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.conftest import base_overrides, run_trainer
from tests.launcher import REPO, launcher_command, rank_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

# The vocabulary matrices (512 rows) split into blocks of 200, 200 and 112 rows: checkpoints,
# resume, zero_to_fp32 and the HF export all go through the per-block parameter names.
COMMON = {"train.max_steps": 8, "checkpoint.every_steps": 2, "checkpoint.keep_last": 2,
          "optim.schedule": "cosine", "optim.warmup_steps": 2, "model.vocab_block_rows": 200}
SKIPPED = "3,5"  # odd steps: no save is due at them, so the checkpoints stay at steps 2, 4, 6 and 8


def _start(assets, out, dump, *, env=None, hang_before_step=None, ds="ds_configs/zero3.json", count_as_skipped="",
           **extra):
    """Like tests.launcher.launch, but returns the running launcher (output to DUMP/launcher.log)."""
    os.makedirs(dump, exist_ok=True)
    args = ["--deepspeed", ds, "--dump", dump, "--count-as-skipped", count_as_skipped]
    if hang_before_step:
        args += ["--hang-before-step", str(hang_before_step)]
    cmd = launcher_command(os.path.join(REPO, "tests/e2e/run_trainer.py"),
                           [*args, *base_overrides(assets, out, **{**COMMON, **extra})], nproc=2)
    log = open(os.path.join(dump, "launcher.log"), "w")
    return subprocess.Popen(cmd, cwd=REPO, env=rank_env(env), stdout=log, stderr=subprocess.STDOUT)


def _log(dump):
    with open(os.path.join(dump, "launcher.log")) as f:
        return f.read()[-4000:]


def _steps(dump):
    with open(os.path.join(dump, "steps.jsonl")) as f:
        return {rec["step"]: rec for rec in map(json.loads, f)}


def _tensorboard_losses(out):
    """(step, loss) as TensorBoard's own loader shows the run's event files (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("loss")]


def _export_equals_engine(out):
    """output_dir/hf loads with from_pretrained, gives the engine's logits on the probe batch and
    holds the engine's weights bitwise; returns the loaded model."""
    from transformers import AutoModelForCausalLM

    from megakto.checkpoint import probe_batch

    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf")).eval()
    with torch.no_grad():
        logits = model(input_ids=probe_batch(model.config.vocab_size)).logits
    engine_logits = torch.load(os.path.join(out, "dump", "logits.pt"), weights_only=True)
    assert float((logits - engine_logits).abs().max()) <= 1e-6
    weights = load_file(os.path.join(out, "hf", "model.safetensors"))
    policy = torch.load(os.path.join(out, "dump", "policy.pt"), weights_only=True)
    assert set(weights) == set(policy) and all(torch.equal(weights[k], policy[k]) for k in policy)
    return model


def _latest(out):
    path = os.path.join(out, "checkpoints", "latest")
    return open(path).read() if os.path.exists(path) else None


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    _, result = run_trainer(assets, out, nproc=2, trainer_args=["--count-as-skipped", SKIPPED], **COMMON,
                            **{"train.export_hf": "true"})
    return out, result


@pytest.fixture(scope="module")
def interrupted(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("interrupted")
    seen = {}

    # A: crash inside the step-6 save.
    proc = _start(assets, out, out / "dumpA", env={"MEGAKTO_FAULT_EXIT_IN_SAVE": "6"}, count_as_skipped=SKIPPED)
    assert proc.wait(timeout=300) != 0, _log(out / "dumpA")
    seen["after_A"] = sorted(os.listdir(out / "checkpoints")), _latest(out)

    # B: resume, then SIGKILL rank 1 while both ranks wait to start step 7.
    proc = _start(assets, out, out / "dumpB", hang_before_step=7, count_as_skipped=SKIPPED,
                  **{"train.resume": "auto"})
    deadline = time.time() + 300
    while not all(os.path.exists(out / "dumpB" / f"hanging_rank{r}") for r in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, _log(out / "dumpB")
        time.sleep(0.5)
    seen["before_kill"] = _latest(out)
    os.kill(int((out / "dumpB" / "pid_rank1").read_text()), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0, _log(out / "dumpB")

    # C: resume and finish.
    proc = _start(assets, out, out / "dumpC", count_as_skipped=SKIPPED, **{"train.resume": "auto"})
    assert proc.wait(timeout=300) == 0, _log(out / "dumpC")
    with open(out / "dumpC" / "result.json") as f:
        result = json.load(f)
    return out, seen, result


def test_crash_in_save_leaves_previous_checkpoint(interrupted):
    """After A, step 6 is only a temporary directory (all files written, never committed) and
    ``latest`` still names step 4; B resumed from step 4, not from the half-saved step 6."""
    out, seen, _ = interrupted
    names, latest = seen["after_A"]
    assert latest == "step-00000004"
    assert names == [".tmp-step-00000006", "hf_base", "latest", "step-00000002", "step-00000004",
                     "zero_to_fp32.py", "zero_to_torch.py"]
    assert sorted(_steps(out / "dumpA")) == [1, 2, 3, 4, 5, 6]
    assert sorted(_steps(out / "dumpB")) == [5, 6]
    assert seen["before_kill"] == "step-00000006"
    assert "resumed from" in _log(out / "dumpB") and "step-00000004 at step 4" in _log(out / "dumpB")


def test_resumed_losses_rows_and_weights_equal_straight_run(straight, interrupted):
    s_out, s_result = straight
    out, _, result = interrupted
    a, b = _steps(out / "dumpA"), _steps(out / "dumpB")
    c = {7 + i: {"metrics": m, "indices": ix} for i, (m, ix) in enumerate(zip(result["history"], result["indices"]))}
    assert sorted(c) == [7, 8]  # C ran only the last two steps
    consumed = {**{k: a[k] for k in (1, 2, 3, 4)}, **{k: b[k] for k in (5, 6)}, **c}
    for step in range(1, 9):
        ref = s_result["history"][step - 1]
        got = consumed[step]["metrics"]
        for key in ("loss", "kl", "learning_rate", "rewards/margins", "grad_norm"):
            assert got[key] == pytest.approx(ref[key], abs=1e-7, rel=0), (step, key)
        assert consumed[step]["indices"] == s_result["indices"][step - 1], step
    # The data stream: same multiset of rows, and within this epoch (128 of 800 rows) none twice.
    rows = [i for step in range(1, 9) for i in consumed[step]["indices"]]
    assert Counter(rows) == Counter(i for ix in s_result["indices"] for i in ix)
    assert len(set(rows)) == len(rows) == 8 * 16
    # The LR schedule really moved (warm-up, then cosine decay), so restoring it mattered.
    lrs = [h["learning_rate"] for h in s_result["history"]]
    assert lrs[0] < lrs[1] and lrs[4] > lrs[7] > 0
    ref = torch.load(os.path.join(s_out, "dump", "policy.pt"), weights_only=True)
    got = torch.load(os.path.join(out, "dumpC", "policy.pt"), weights_only=True)
    assert set(ref) == set(got)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_skipped_steps_and_health_window_continue_across_resumes(straight, interrupted):
    """C (resumed at step 6, after A's skip at step 3 and B's at step 5) ends with the reference's
    skipped-step count (2, not the 0 of a restarted counter) and the reference's health window: all
    8 steps' metrics (not only C's 7-8), its run summary and report times."""
    ref, got = straight[1], interrupted[2]
    assert ref["skipped_steps"] == got["skipped_steps"] == {"total": 2, "consecutive": 0, "first_of_run": None}
    assert [h["train/skipped_steps"] for h in ref["history"]] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert [h["train/skipped_steps"] for h in got["history"]] == [2, 2]  # C's steps 7-8
    ref_health, got_health = ref["health"], got["health"]
    assert len(ref_health["history"]) == len(got_health["history"]) == 8
    keys = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm")
    for step, (want, have) in enumerate(zip(ref_health["history"], got_health["history"]), start=1):
        for key in keys:
            assert have[key] == pytest.approx(want[key], abs=1e-7, rel=0), (step, key)
    assert got_health["history"][0]["loss"] != got_health["history"][7]["loss"]
    want, have = ref_health["summary"], got_health["summary"]
    assert have["steps"] == want["steps"] == 8 and have["kl_all_zero"] == want["kl_all_zero"]
    assert want["peak_grad_norm"] > 0
    assert have["peak_grad_norm"] == pytest.approx(want["peak_grad_norm"], abs=1e-7, rel=0)
    assert have["norms"] == pytest.approx(want["norms"], abs=1e-7, rel=0) and len(have["norms"]) == 8
    assert got_health["last"] == ref_health["last"]


def test_keep_last_prunes_old_checkpoints(straight, interrupted):
    """keep_last=2: only the newest two complete tags survive; no temporary directory is left."""
    for out in (straight[0], interrupted[0]):
        names = sorted(os.listdir(os.path.join(out, "checkpoints")))
        assert names == ["hf_base", "latest", "step-00000006", "step-00000008", "zero_to_fp32.py", "zero_to_torch.py"]
        assert _latest(out) == "step-00000008"


def test_export_hf_matches_engine(straight):
    """train.export_hf: output_dir/hf loads with from_pretrained and reproduces the engine's logits
    (run_trainer computed them with the ZeRO-3 engine after training) and its gathered weights."""
    from transformers import AutoTokenizer

    out, _ = straight
    model = _export_equals_engine(out)
    assert model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(out, "hf"))
    assert tokenizer.chat_template and "<|assistant|>" in tokenizer.chat_template
    assert os.path.isfile(os.path.join(out, "hf", "generation_config.json"))


def test_zero_to_hf_tool_check(straight, tmp_path):
    """tools/zero_to_hf.py --check on the run's checkpoints/ (newest tag): exit 0, diff printed;
    and the same check on a folder with one weight nudged by 1e-3 reports a difference > 1e-5."""
    from megakto.checkpoint import check_export

    out, _ = straight
    dest = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "tools/zero_to_hf.py", os.path.join(out, "checkpoints"), str(dest),
                           "--check"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "check: max abs logit diff 0 (ok" in proc.stdout
    assert "step-00000008" in proc.stdout
    exported = load_file(dest / "model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in load_file(os.path.join(out, "hf", "model.safetensors")).items())

    from safetensors.torch import save_file

    exported["model.norm.weight"] = exported["model.norm.weight"] + 1e-3
    save_file(exported, dest / "model.safetensors", metadata={"format": "pt"})
    assert check_export(str(dest), os.path.join(out, "checkpoints", "step-00000008")) > 1e-5


def test_resume_with_other_vocab_blocks_is_refused(assets, straight, tmp_path):
    """A checkpoint's parameters are named per vocabulary block: resuming it with another
    model.vocab_block_rows stops every rank with one line naming the key, before any loading."""
    from tests.launcher import launch

    out, _ = straight
    tag = os.path.join(out, "checkpoints", "step-00000008")
    proc = launch("launch/train_kto.py", ["--deepspeed", "ds_configs/zero3.json", *base_overrides(
        assets, tmp_path / "other", **{**COMMON, "model.vocab_block_rows": 0, "train.resume": tag})], nproc=2,
        timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "megakto: error:" in line]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert "has its vocabulary matrices 3 blocks of 200 rows, this run unsplit; set model.vocab_block_rows" \
        in lines[0]


def test_tensorboard_shows_each_step_once(straight, interrupted):
    """Across both crashes and resumes the loss curve TensorBoard loads is the straight run's:
    the checkpoint steps (4, 6) written before each crash survive, steps the crashed runs logged
    past them (5-6 from A) are purged, and nothing appears twice."""
    ref = _tensorboard_losses(straight[0])
    got = _tensorboard_losses(interrupted[0])
    assert [s for s, _ in ref] == [s for s, _ in got] == list(range(1, 9))
    assert [v for _, v in got] == pytest.approx([v for _, v in ref], abs=1e-7, rel=0)


@pytest.fixture(scope="module", params=["zero1", "zero2"])
def zero12(request, assets, tmp_path_factory):
    """ZeRO-1/2: run X (4 steps) crashes inside the step-4 save, run Y resumes from step 2 and
    exports. X's steps are the uninterrupted reference for Y's."""
    stage = request.param
    out = tmp_path_factory.mktemp(stage)
    short = {"train.max_steps": 4, "ds": f"ds_configs/{stage}.json"}
    proc = _start(assets, out, out / "dumpX", env={"MEGAKTO_FAULT_EXIT_IN_SAVE": "4"}, **short)
    assert proc.wait(timeout=300) != 0, _log(out / "dumpX")
    assert _latest(out) == "step-00000002"
    proc = _start(assets, out, out / "dump", **short, **{"train.resume": "auto", "train.export_hf": "true"})
    assert proc.wait(timeout=300) == 0, _log(out / "dump")
    with open(out / "dump" / "result.json") as f:
        return out, json.load(f)


def test_zero12_resume_and_export(zero12, tmp_path):
    """Resume from a ZeRO-1/2 checkpoint gives the uninterrupted losses; train.export_hf and
    tools/zero_to_hf.py --check convert it; TensorBoard shows steps 1-4 once each."""
    out, result = zero12
    assert "step-00000002 at step 2" in _log(out / "dump")
    x = _steps(out / "dumpX")
    assert sorted(x) == [1, 2, 3, 4] and len(result["history"]) == 2
    for step, got in zip((3, 4), result["history"]):
        for key in ("loss", "kl", "learning_rate", "grad_norm"):
            assert got[key] == pytest.approx(x[step]["metrics"][key], abs=1e-7, rel=0), (step, key)
    shown = _tensorboard_losses(out)
    assert [s for s, _ in shown] == [1, 2, 3, 4]
    assert [v for _, v in shown] == pytest.approx([x[s]["metrics"]["loss"] for s in (1, 2, 3, 4)], abs=1e-6, rel=0)
    _export_equals_engine(out)
    proc = subprocess.run([sys.executable, "tools/zero_to_hf.py", os.path.join(out, "checkpoints"),
                           str(tmp_path / "hf"), "--check"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "check: max abs logit diff 0 (ok" in proc.stdout, proc.stderr[-2000:]


def _damaged_copy(straight, dest):
    """The reference run's checkpoints (steps 6 and 8) with 4 KB of step 8's rank-0 optimizer
    state overwritten in place: same size, so only the checksum can tell."""
    shutil.copytree(os.path.join(straight[0], "checkpoints"), dest / "checkpoints")
    victim = dest / "checkpoints" / "step-00000008" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xa5" * 4096)
    assert os.path.getsize(victim) == size
    return victim


def test_damaged_checkpoint_is_refused_in_one_line(assets, straight, tmp_path):
    """train.resume naming a checkpoint whose file was damaged (size kept): every rank exits 1,
    one line names the file."""
    from tests.launcher import launch

    victim = _damaged_copy(straight, tmp_path)
    proc = launch("launch/train_kto.py", ["--deepspeed", "ds_configs/zero3.json", *base_overrides(
        assets, tmp_path, **{**COMMON, "train.resume": str(victim.parent)})], nproc=2, timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "megakto: error:" in line]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].endswith(f"megakto: error: train.resume={victim.parent}: not a loadable checkpoint: {victim.name} "
                             "does not match its sha256 in the manifest (damaged after the save); pass a complete "
                             "step-* directory, auto or none")


def test_auto_skips_damaged_newest(assets, straight, tmp_path):
    """train.resume=auto with the newest checkpoint damaged: a warning names it and why, the run
    resumes from step 6 instead and steps 7-8 give the reference's losses."""
    s_out, s_result = straight
    victim = _damaged_copy(straight, tmp_path)
    proc = _start(assets, tmp_path, tmp_path / "dump", **{"train.resume": "auto"})
    assert proc.wait(timeout=300) == 0, _log(tmp_path / "dump")
    log = (tmp_path / "dump" / "launcher.log").read_text()
    assert (f"megakto: warning: train.resume=auto: skipping {victim.parent}: {victim.name} does not match its "
            "sha256 in the manifest (damaged after the save)") in log
    assert "step-00000006 at step 6" in log
    c = _steps(tmp_path / "dump")
    assert sorted(c) == [7, 8]
    for step in (7, 8):
        assert c[step]["metrics"]["loss"] == pytest.approx(s_result["history"][step - 1]["loss"], abs=1e-7, rel=0)
