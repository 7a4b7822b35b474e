"""The memory plan under Ulysses sequence parallelism (hand-worked), and the shipped long-completion
recipes: a 32k-token completion for an 8B-class and a 32B-class model on one node of 8 GPUs, each
checked by ``--dry-run`` (in this process, no data: the model folders hold config.json only)."""

import os

import pytest

from megakto.planning.activations import Tokens, sequence_shard_tokens, train_pass, ulysses_bytes_per_token
from megakto.planning.plan import PlanInputs, plan_memory
from tests.launcher import load_script
from tests.planning.test_plan import TOY

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = {"llama3.1-8b_sp8": "parameters: embedding 0.525B, layers 6.980B, head 0.525B",
           "qwen2.5-32b_sp8": "parameters: embedding 0.779B, layers 31.207B, head 0.779B"}


def test_a_rank_holds_its_share_of_the_tokens():
    """8192 tokens in 4 rows at sp 4: 2048 local tokens, in one row of 8192 (what attention sees)."""
    assert sequence_shard_tokens(Tokens(8192, 6000, 4, 2048), 4) == Tokens(2048, 1500, 1, 8192)
    assert sequence_shard_tokens(Tokens(8193, 7, 1, 8193), 2) == Tokens(4097, 4, 1, 8193)  # rounded up
    assert sequence_shard_tokens(Tokens(10, 5, 2, 5), 1) == Tokens(10, 5, 2, 5)


def test_train_pass_activations_by_hand():
    """TOY, bf16, flash, no checkpointing, 4096 tokens in one row at sp 2: 2048 local tokens. Per token
    and layer: the layer's own 2·8·64 + 2·(5·64 + 4·32 + 4·128) = 1024 + 1920 = 2944 bytes, and the
    all-to-alls 2·(2·64 + 2·max(2, 2)·16) = 384: 3328 · 2048 = 6,815,744 per layer, 2 layers; the final
    norm 8·64·2048 = 1,048,576 and the scored hidden 64·2·1024 = 131,072."""
    assert ulysses_bytes_per_token(TOY, w=2, sp=2) == 384
    got = train_pass(TOY, Tokens(4096, 2048, 1, 4096), w=2, tp=1, checkpointing=False, attn="flash_attention_2", sp=2)
    assert got == {"activations": 2 * 6_815_744 + 1_048_576 + 131_072, "backward": 6_815_744}


def test_sequence_ranks_shard_the_states_and_split_the_activations():
    """World 8 as sp 8 (dp 1) against dp 8: ZeRO-3 partitions over all 8 ranks either way (equal model
    states); a 32k-token micro-batch's activations per rank fall about 8-fold (the all-to-alls' buffers
    take a little back), the train phase with them (its head block and gathered weights do not fall)."""
    tokens = Tokens(32768, 30000, 1, 32768)
    common = dict(shape=TOY, world_size=8, zero={"stage": 3}, weight_bytes=2, checkpointing=True,
                  attn="flash_attention_2", train_tokens=tokens, ref="none")
    sp8 = plan_memory(PlanInputs(dp=1, sp=8, **common))
    dp8 = plan_memory(PlanInputs(dp=8, **common))
    assert [r for r in sp8.rows if r[0].startswith("policy")] == [r for r in dp8.rows if r[0].startswith("policy")]
    whole, shard = (train_pass(TOY, tokens, w=2, tp=1, checkpointing=True, attn="flash_attention_2", sp=sp)
                    for sp in (1, 8))
    assert 6 < whole["activations"] / shard["activations"] < 8
    assert dp8.phases["train"] / sp8.phases["train"] > 5


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_long_completion_recipe_dry_runs_and_fits(name, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    folder = os.path.join(REPO, "configs", "long-completions")
    launcher = load_script("launch/train_kto.py", "train_kto")
    assert launcher.main(["--dry-run", "--no-data", "--world-size", "8", "--gpu-memory", "80",
                          "--config", os.path.join(folder, f"{name}.yaml"),
                          "--deepspeed", os.path.join(folder, f"{name}.json"), f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "dry run: parallelism: world 8 = dp 1 × tp 1 × pp 1 × sp 8;" in out
    assert "memory plan: world 8 = dp 1 x tp 1 x pp 1 x sp 8, ZeRO-3" in out
    assert RECIPES[name] in out and "tokens per rank of each sequence group of 8" in out
    assert "fits: yes" in out and out.rstrip().endswith("dry run: ok")
