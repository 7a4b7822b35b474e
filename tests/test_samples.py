"""Eval samples (megakto/samples.py): when a run generates them, and what one evaluation writes,
with stand-in engines whose ``generate`` appends fixed tokens (no model, no process group)."""

import json
from types import SimpleNamespace

import torch
from datasets import Dataset

from megakto.config import load_config
from megakto.data.split import TokenizedSplit
from megakto.reference.scorers import CachedReference
from megakto.samples import EvalSamples, eval_samples


class _Tokenizer:
    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


class _Generates(torch.nn.Module):
    """``generate`` appends ``tokens`` to the prompt, as greedy decoding of a fixed model would."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens

    def generate(self, input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor([self.tokens])], dim=1)


def _engine(tokens):
    return SimpleNamespace(module=_Generates(tokens))


def _eval_rows():
    ds = Dataset.from_dict({"prompt_ids": [[5], [5], [6, 7], [8]], "completion_ids": [[9]] * 4,
                            "label": [True, False, True, False], "prompt_key": [0, 0, 1, 2]})
    return TokenizedSplit(ds)


def _cfg(tmp_path, k):
    return load_config(None, ["model.path=unused", "data.train_files=unused", f"output_dir={tmp_path}",
                              f"train.eval_samples={k}", "train.sample_max_new_tokens=2"])


def test_samples_are_off_without_prompts_evaluation_or_a_mode_that_generates(tmp_path):
    logged = []
    kwargs = dict(device="cpu", log=logged.append)
    assert eval_samples(_cfg(tmp_path, 0), _eval_rows(), _Tokenizer(), evaluating=True, off=None, **kwargs) is None
    assert eval_samples(_cfg(tmp_path, 2), _eval_rows(), _Tokenizer(), evaluating=False, off="no", **kwargs) is None
    assert logged == []
    assert eval_samples(_cfg(tmp_path, 2), _eval_rows(), _Tokenizer(), evaluating=True, off="why", **kwargs) is None
    assert logged == ["why"]


def test_one_evaluation_writes_the_policy_and_the_reference_per_prompt(tmp_path):
    """The first 2 distinct prompts ([5], [6, 7]); the policy appends 2 3, the reference 4 4; a
    cached reference has no model: its column is empty."""
    samples = eval_samples(_cfg(tmp_path, 2), _eval_rows(), _Tokenizer(), evaluating=True, off=None, device="cpu",
                           log=print)
    assert isinstance(samples, EvalSamples) and samples.prompts == [[5], [6, 7]]
    texts = []
    log = SimpleNamespace(text=lambda tag, text, step: texts.append((tag, step, text)))
    samples(3, _engine([2, 3]), SimpleNamespace(engine=_engine([4, 4])), log)  # an online reference
    samples(6, _engine([2, 3]), CachedReference(cache=None, device="cpu"), log)
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert records == [{"step": 3, "prompt": "5", "policy": "2 3", "reference": "4 4"},
                       {"step": 3, "prompt": "6 7", "policy": "2 3", "reference": "4 4"},
                       {"step": 6, "prompt": "5", "policy": "2 3", "reference": None},
                       {"step": 6, "prompt": "6 7", "policy": "2 3", "reference": None}]
    assert [(tag, step) for tag, step, _ in texts] == [("samples", 3), ("samples", 6)]
    assert "| 6 7 | 2 3 | (none) |" in texts[1][2]
