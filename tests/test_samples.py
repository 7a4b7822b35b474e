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
    """``generate`` appends ``tokens`` to each prompt of the batch, as greedy decoding of a fixed model would."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens

    def generate(self, input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor([self.tokens]).expand(len(input_ids), -1)], dim=1)


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


def test_batched_generation_gives_the_greedy_text_of_one_prompt_at_a_time(tmp_path):
    """The demo model in fp32: prompts of different lengths, left-padded into one batch, complete to
    the same greedy ids as each prompt alone (no padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megakto._demo.data import format_prompt
    from megakto._demo.tiny_model import make_tiny_model
    from megakto.samples import generate

    folder = make_tiny_model(tmp_path / "model", seed=1)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompts = [tok(format_prompt(n))["input_ids"] for n in ([7, 2, 9, 4], [1], [3, 8, 5, 6, 0, 2, 4], [5, 5])]
    assert len({len(p) for p in prompts}) == 4  # padding differs per row
    kwargs = dict(max_new_tokens=12, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, device="cpu", synced=False)
    alone = [generate(model, [p], **kwargs)[0] for p in prompts]
    assert generate(model, prompts, **kwargs) == alone
    assert all(0 < len(c) <= 12 for c in alone)


def test_default_turns_samples_off_with_a_line_for_a_model_that_does_not_fit(tmp_path):
    """train.eval_samples: null and a planner that marks the gathered model as not fitting on one
    device (a Qwen2.5-32B shape under ZeRO-3 on 8 GPUs of 80 GiB): no samples, one line giving the
    cost and the setting that turns them on. The same model with samples asked for (3): generated,
    not gathered."""
    from megakto.model.shape import ModelShape
    from megakto.planning.plan import GIB, PlanInputs, plan_memory
    from megakto.planning.samples_cost import SamplesWork, samples_cost

    layer = (5120 * 5120, 5120 * 1024, 5120 * 1024, 5120 * 5120, 5120 * 27648, 5120 * 27648, 27648 * 5120, 5120, 5120)
    shape = ModelShape(hidden=5120, intermediate=27648, layers=64, heads=40, kv_heads=8, head_dim=128, vocab=152064,
                       embedding=152064 * 5120, head=152064 * 5120, layer_params=layer)
    plan = plan_memory(PlanInputs(shape=shape, world_size=8, dp=8, zero={"stage": 3}, weight_bytes=2, on_gpu=True))
    work = SamplesWork(prompts=2, prompt_tokens=2, new_tokens=24, models=2, step_tokens=64 * 1024, steps_between=100)

    def cost(prompts):
        return samples_cost(plan, work, device_bytes=80 * GIB)

    assert not cost(None).fits
    logged = []
    cfg = load_config(None, ["model.path=unused", "data.train_files=unused", f"output_dir={tmp_path}"])
    assert cfg.train.eval_samples is None  # the default
    assert eval_samples(cfg, _eval_rows(), _Tokenizer(), evaluating=True, off=None, device="cpu", log=logged.append,
                        cost=cost) is None
    assert len(logged) == 1 and logged[0].startswith("eval samples: off by default for this model: 3 prompts")
    assert "does not fit" in logged[0] and logged[0].endswith("set train.eval_samples=3 to turn them on")
    asked = eval_samples(_cfg(tmp_path, 3), _eval_rows(), _Tokenizer(), evaluating=True, off=None, device="cpu",
                         log=logged.append, cost=cost)
    assert isinstance(asked, EvalSamples) and not asked.gather and "not gathered" in logged[1]
