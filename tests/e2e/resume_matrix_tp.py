"""The tensor-parallel pairs of the resume matrix (tests/e2e/_resume_pairs.py), run by
tools/resume_matrix.sh, not by the default suite (the file name is not collected)."""

import pytest

from tests.e2e._resume_pairs import Layout, compare, resume_on, run_source

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

TP2 = Layout("TP2 ZeRO-3 (2 ranks)", 2, settings={"parallel.tp_size": 2})
TP2_DP2 = Layout("TP2 × DP2 ZeRO-3 (4 ranks)", 4, settings={"parallel.tp_size": 2})


@pytest.fixture(scope="module")
def tp2(assets, tmp_path_factory):
    return run_source(assets, tmp_path_factory.mktemp("tp2"), TP2)


def test_tp2_to_tp2_dp2(assets, tp2, tmp_path):
    _, result = resume_on(assets, tp2, tmp_path, TP2_DP2)
    compare("TP2 -> TP2 x DP2", tp2, TP2_DP2, result, tmp_path)
