"""Under the real launcher (2 ranks), an attention implementation the model cannot run stops every
rank with one line before any weights load: the folder's config.json says Gemma2 while its
weights are a tiny Llama's, so reaching from_pretrained would fail differently."""

import json

import pytest
from transformers import Gemma2Config

from megakto._demo.data import write_demo_data
from megakto._demo.tiny_model import make_tiny_model
from tests.launcher import launch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_unsupported_attention_stops_every_rank_before_loading(tmp_path):
    model = make_tiny_model(tmp_path / "model", seed=0)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    Gemma2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16).save_pretrained(model)
    train, _ = write_demo_data(tmp_path / "data", n_train_prompts=40, n_eval_prompts=4, seed=0)
    args = ["--deepspeed", "ds_configs/zero3.json", f"model.path={model}", f"data.train_files={train}",
            "data.max_length=64", "train.global_batch_size=8", "train.micro_batch_size=4",
            "model.attn_implementation=sdpa", f"output_dir={tmp_path / 'out'}"]
    proc = launch("launch/train_kto.py", args, nproc=2, timeout=200)
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if "megakto: error:" in line]
    assert proc.returncode != 0
    assert len(lines) == 1, output[-4000:]
    assert (f"model.attn_implementation=sdpa cannot run Gemma2ForCausalLM (model.path={model}): "
            in lines[0]), lines[0]
    assert "choices that work here: auto, eager" in lines[0], lines[0]
    assert "Traceback" not in output, output[-4000:]
