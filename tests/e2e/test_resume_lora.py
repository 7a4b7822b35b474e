"""LoRA under ZeRO-3 resumed at another data-parallel size (2 ranks -> 1) through its universal
form: the representative LoRA pair of the resume matrix (tests/e2e/resume_matrix_lora.py runs
4 -> 2 through tools/resume_matrix.sh). Run B continues run A within tests/e2e/_resume_pairs.py's
tolerances, only the adapters train (its base is model.path's, bitwise), its exports (merged model
and adapter) match A's, and the universal folder exports the complete model, its frozen base
included (tests/e2e/_lora_pairs.py).

On run A's step-4 tag, tools/to_universal.py killed right after DeepSpeed's merge stage (the test
hook exits there, as a SIGKILL would) commits nothing; run again it continues after the finished
stages (extraction and merge are not redone: the merged files keep their times) and writes the bytes
of an uninterrupted conversion."""

import os
import subprocess
import sys

import pytest
import torch

from tests.e2e._lora_pairs import lora_layout, lora_source, resume_pair
from tests.launcher import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def lora2(assets, tmp_path_factory):
    return lora_source(assets, tmp_path_factory, 2)


def test_lora_2_to_1(assets, lora2, tmp_path):
    resume_pair(assets, lora2, tmp_path, lora_layout(1))


def _convert(tag, out, **env):
    return subprocess.run([sys.executable, "tools/to_universal.py", tag, out], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def _tree(folder):
    return {os.path.relpath(os.path.join(d, n), folder): (os.path.join(d, n)) for d, _, names in os.walk(folder)
            for n in names}


def test_a_killed_conversion_continues_after_its_last_stage(lora2, tmp_path):
    from megakto.checkpoint import DIGEST, MANIFEST, TMP_PREFIX, read_manifest, verify
    from megakto.checkpoint._stages import FAULT_ENV, RECORD

    whole, out = str(tmp_path / "whole" / "universal-step-00000004"), str(tmp_path / "universal-step-00000004")
    assert _convert(lora2["tag"], whole).returncode == 0
    work = str(tmp_path / (TMP_PREFIX + "universal-step-00000004"))
    killed = _convert(lora2["tag"], out, **{FAULT_ENV: "merge"})
    assert killed.returncode == 1 and not os.path.exists(out)
    import json
    with open(os.path.join(work, RECORD)) as f:
        assert json.load(f)["done"] == ["extract", "merge"]
    staged = _tree(os.path.join(work, "universal-step-00000004"))
    merged = sorted(rel for rel in staged if rel.startswith("zero" + os.sep))
    assert len(merged) == 3 * 28  # fp32, exp_avg, exp_avg_sq of each adapter matrix
    # One merged file marked (+1): the rerun keeps it only if it does not merge again.
    marked = next(rel for rel in merged if rel.endswith("fp32.pt"))
    torch.save(torch.load(staged[marked], weights_only=True) + 1, staged[marked])

    again = _convert(lora2["tag"], out)
    assert again.returncode == 0, again.stderr
    assert (f"megakto: continuing the conversion of {lora2['tag']} after its finished stages (extract, merge)"
            in again.stderr)
    files, want = _tree(out), _tree(whole)
    assert sorted(files) == sorted(want)
    for rel in files:
        if rel == marked:  # not merged again: the mark is there, in the universal layout (reshaped)
            got, base = (torch.load(f[rel], weights_only=True)["param"] for f in (files, want))
            assert torch.equal(got, base + 1), rel
        else:
            assert rel == MANIFEST or open(files[rel], "rb").read() == open(want[rel], "rb").read(), rel
    digests, whole_digests = read_manifest(out)[DIGEST], read_manifest(whole)[DIGEST]
    assert sorted(digests) == sorted(whole_digests) and verify(out, collective=False) is None
    assert {k: v for k, v in digests.items() if k != marked} == {k: v for k, v in whole_digests.items() if k != marked}
    assert "frozen" in read_manifest(out) and not os.path.exists(work)


def test_another_base_is_refused_at_resume(assets, lora2, tmp_path):
    """model.path of the same shapes but other weights: the resume through the universal folder
    (whose base comes from model.path) stops in one line on every rank, naming the first frozen
    parameter that differs from the checkpoint's base."""
    from megakto._demo.tiny_model import make_tiny_model
    from tests.e2e._lora_pairs import LORA
    from tests.e2e._resume_pairs import RUN
    from tests.e2e.conftest import base_overrides
    from tests.launcher import launch

    other = make_tiny_model(tmp_path / "other", seed=1)
    settings = {**RUN, **LORA, "train.resume": lora2["tag"], "model.path": str(other)}
    proc = launch("launch/train_kto.py", ["--deepspeed", "ds_configs/zero3.json",
                                          *base_overrides(assets, tmp_path, **settings)], nproc=1, timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "megakto: error:" in line]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    frozen = tmp_path / "checkpoints" / "universal-step-00000004" / "frozen_params.pt"
    assert lines[0].endswith(f"train.resume: {lora2['tag']}: the frozen weights of model.path={other} are not the "
                             f"checkpoint's (base_model.model.model.embed_tokens.weight differs from {frozen}); "
                             "resume with the base model the run was trained from"), lines[0]
