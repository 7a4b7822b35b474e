"""Across layouts in CI: a ZeRO-3 data-parallel checkpoint (2 ranks) resumed under a 2-stage
pipeline (ZeRO-1, 2 ranks), the one pipeline pair of the resume matrix that the suite runs
(tests/e2e/resume_matrix_pp.py holds them all). It goes through every part of the mechanism: the
universal conversion, the ZeRO-3 folder made loadable by a ZeRO-1 engine, the parameters renamed
from Hugging Face names to the pipeline's layer names, the trainer state's shapes checked stage by
stage; run B must continue run A (rows, loss and KL per step, final weights: _resume_pairs.compare)."""

import pytest

from tests.e2e._resume_pairs import compare, resume_on, run_source
from tests.e2e.resume_matrix_pp import PP2, Z3_DP2

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_zero3_dp2_resumes_under_pp2(assets, tmp_path):
    source = run_source(assets, tmp_path / "a", Z3_DP2)
    log, result = resume_on(assets, source, tmp_path / "b", PP2)
    assert "universal-step-00000004" in log, log[-2000:]
    compare("ZeRO-3 DP2 -> PP2", source, PP2, result, tmp_path / "b")
