"""The resume matrix's pairs at another tensor-parallel degree and across the ZeRO data-parallel <->
tensor-parallel layouts (tests/e2e/_resume_pairs.py), run by tools/resume_matrix.sh, not by the
default suite (the file name is not collected). Every pair goes through the checkpoint's universal
form: whole tensors (fp32 masters and both Adam moments) that each target cuts for its own tp rank."""

import pytest

from tests.e2e._resume_pairs import Layout, compare, resume_on, run_source

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

# Another tp degree computes each sequence's log-probs in another order (a vocabulary-parallel
# log-sum-exp over the head's row shards, row-parallel sums in attention and MLP): KL subtracts two
# sums of about -75 whose float32 spacing is 7.6e-6, so it moves by about 1e-6 (measured up to
# 1.4e-6 TP2 -> TP1), the tolerance that tests/e2e/test_tensor_parallel.py holds TP2 against one
# process to (1e-5). Loss, margins and weights keep the harness's bounds.
KL_ABS = 1e-5

TP2 = Layout("TP2 ZeRO-3 (2 ranks)", 2, settings={"parallel.tp_size": 2})
TP1 = Layout("ZeRO-3 (1 rank)", 1)
DP2 = Layout("ZeRO-3 DP2 (2 ranks)", 2)
TP2_Z1 = Layout("TP2 ZeRO-1 (2 ranks)", 2, ds="ds_configs/zero1.json", settings={"parallel.tp_size": 2})
DP2_Z1 = Layout("ZeRO-1 DP2 (2 ranks)", 2, ds="ds_configs/zero1.json")
TP1_Z2 = Layout("ZeRO-2 (1 rank)", 1, ds="ds_configs/zero2.json")
TP2_Z2 = Layout("TP2 ZeRO-2 (2 ranks)", 2, ds="ds_configs/zero2.json", settings={"parallel.tp_size": 2})


@pytest.fixture(scope="module")
def tp2(assets, tmp_path_factory):
    return run_source(assets, tmp_path_factory.mktemp("tp2"), TP2)


@pytest.fixture(scope="module")
def dp2(assets, tmp_path_factory):
    return run_source(assets, tmp_path_factory.mktemp("dp2"), DP2)


def test_tp2_to_tp1(assets, tp2, tmp_path):
    _, result = resume_on(assets, tp2, tmp_path, TP1)
    compare("TP2 -> TP1", tp2, TP1, result, tmp_path, kl_abs=KL_ABS)


def test_tp2_to_dp2(assets, tp2, tmp_path):
    _, result = resume_on(assets, tp2, tmp_path, DP2)
    compare("TP2 -> ZeRO-3 DP2", tp2, DP2, result, tmp_path, kl_abs=KL_ABS)


def test_dp2_to_tp2(assets, dp2, tmp_path):
    _, result = resume_on(assets, dp2, tmp_path, TP2)
    compare("ZeRO-3 DP2 -> TP2", dp2, TP2, result, tmp_path, kl_abs=KL_ABS)


def test_tp2_to_tp4(assets, tmp_path_factory, tmp_path):
    """The default tiny model has 2 key-value heads; this one has 4 (heads, key-value heads, MLP
    width 128 and vocabulary 512 all divide by 4)."""
    from megakto._demo.tiny_model import make_tiny_model

    model = str(make_tiny_model(tmp_path_factory.mktemp("kv4") / "model", num_kv_heads=4, vocab_size=512, seed=0))
    source = Layout("TP2 ZeRO-3 (2 ranks)", 2, settings={"parallel.tp_size": 2, "model.path": model})
    target = Layout("TP4 ZeRO-3 (4 ranks)", 4, settings={"parallel.tp_size": 4, "model.path": model})
    a = run_source(assets, tmp_path_factory.mktemp("tp2_kv4"), source)
    _, result = resume_on(assets, a, tmp_path, target)
    compare("TP2 -> TP4", a, target, result, tmp_path, kl_abs=KL_ABS)


def test_tp2_zero1_to_dp2(assets, tmp_path_factory, tmp_path):
    a = run_source(assets, tmp_path_factory.mktemp("tp2_z1"), TP2_Z1)
    _, result = resume_on(assets, a, tmp_path, DP2_Z1)
    compare("TP2 -> DP2 (ZeRO-1)", a, DP2_Z1, result, tmp_path, kl_abs=KL_ABS)


def test_zero2_to_tp2(assets, tmp_path_factory, tmp_path):
    a = run_source(assets, tmp_path_factory.mktemp("z2"), TP1_Z2)
    _, result = resume_on(assets, a, tmp_path, TP2_Z2)
    compare("TP1 -> TP2 (ZeRO-2)", a, TP2_Z2, result, tmp_path, kl_abs=KL_ABS)


def test_dp2_vocab_blocks_to_tp2(assets, tmp_path_factory, tmp_path):
    """A data-parallel run with its vocabulary matrices in row blocks (model.vocab_block_rows=128:
    4 blocks) resumed under TP2, which never splits them: the blocks (weights and Adam moments)
    are joined in the universal form."""
    source = Layout("ZeRO-3 DP2, vocab blocks (2 ranks)", 2, settings={"model.vocab_block_rows": 128})
    a = run_source(assets, tmp_path_factory.mktemp("dp2_blocks"), source)
    _, result = resume_on(assets, a, tmp_path, TP2)
    compare("ZeRO-3 DP2 vocab blocks -> TP2", a, TP2, result, tmp_path, kl_abs=KL_ABS)
