"""Eval samples: greedy completions of a few fixed held-out prompts from the policy and from the
reference, so a user sees what the numbers mean (TRL's ``generate_during_eval``).

Generation is Hugging Face's ``generate`` on the engine's module. Under ZeRO-3 every forward
gathers parameters collectively, so every rank generates the same prompts with
``synced_gpus=True`` (a rank that has finished keeps stepping until all have). Rank 0 writes
``output_dir/samples.jsonl`` (one line per prompt and evaluation) and a TensorBoard text entry.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import torch

from megakto.data.split import TokenizedSplit
from megakto.distributed import comm
from megakto.reference.scorers import AdapterOffReference
from megakto.runners.base import model_of

__all__ = ["sample_prompts", "generate", "SampleWriter", "EvalSamples", "eval_samples"]


def sample_prompts(split: TokenizedSplit, k: int) -> list[list[int]]:
    """The prompt ids of the first ``k`` distinct prompts of ``split``, in dataset order."""
    seen, out = set(), []
    for i, key in enumerate(split.prompt_key):
        if len(out) == k:
            break
        if key not in seen:
            seen.add(key)
            out.append(i)
    return [list(p) for p in split.fetch(out)["prompt_ids"]]


@torch.no_grad()
def generate(module: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_id: int,
             eos_id: int | None, device, synced: bool) -> list[list[int]]:
    """Greedy completion ids of each prompt (one ``generate`` call per prompt: no padding to get
    wrong). ``synced``: ZeRO-3 on several ranks, where every rank must take part in every forward."""
    was_training = module.training
    module.eval()
    try:
        out = []
        for prompt in prompts:
            ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
            seq = module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id, synced_gpus=synced)
            out.append(seq[0, ids.shape[1]:].tolist())
        return out
    finally:
        module.train(was_training)


class SampleWriter:
    """Rank 0's ``samples.jsonl``: {step, prompt, policy, reference} per prompt and evaluation."""

    def __init__(self, output_dir: str, tokenizer):
        self.path = os.path.join(output_dir, "samples.jsonl")
        self.tokenizer = tokenizer

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def write(self, step: int, prompts, policy, reference) -> list[dict]:
        """Append one evaluation's samples; returns the records (for TensorBoard)."""
        records = [{"step": step, "prompt": self.decode(p), "policy": self.decode(c),
                    "reference": None if reference is None else self.decode(reference[i])}
                   for i, (p, c) in enumerate(zip(prompts, policy))]
        with open(self.path, "a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
        return records

    @staticmethod
    def markdown(records: list[dict]) -> str:
        def cell(text):
            return "(none)" if text is None else text.replace("|", "\\|").replace("\n", " ")

        rows = [f"| {cell(r['prompt'])} | {cell(r['policy'])} | {cell(r['reference'])} |" for r in records]
        return "\n".join(["| prompt | policy | reference |", "|---|---|---|", *rows])


class EvalSamples:
    """A run's eval samples: the fixed held-out ``prompts``, generated greedily by the policy and the
    reference at every evaluation; rank 0 writes them through ``writer``."""

    def __init__(self, prompts: list[list[int]], writer: SampleWriter, *, max_new_tokens: int, device):
        self.prompts, self.writer = prompts, writer
        self.max_new_tokens, self.device = max_new_tokens, device

    def __call__(self, step: int, policy, reference, log) -> None:
        """Greedy completions of the prompts from ``policy`` (the engine) and ``reference`` (every rank
        takes part: ZeRO-3 gathers in every forward); rank 0 writes them and ``log`` (the run's
        logger) gets a text entry. A cached reference has no model, so its column stays empty."""
        tok = self.writer.tokenizer

        def run(module):
            return generate(module, self.prompts, max_new_tokens=self.max_new_tokens, pad_id=tok.pad_token_id,
                            eos_id=tok.eos_token_id, device=self.device, synced=comm.world_size() > 1)

        policy_out = run(model_of(policy))
        ref_engine = getattr(reference, "engine", None)
        reference_out = run(model_of(ref_engine)) if ref_engine is not None else None
        if isinstance(reference, AdapterOffReference):
            with model_of(policy).disable_adapter():
                reference_out = run(model_of(policy))
        if comm.is_main():
            records = self.writer.write(step, self.prompts, policy_out, reference_out)
            log.text("samples", SampleWriter.markdown(records), step)


def eval_samples(cfg, eval_rows: TokenizedSplit | None, tokenizer, *, evaluating: bool, off: str | None, device,
                 log: Callable[[str], None]) -> EvalSamples | None:
    """The samples of ``train.eval_samples`` over ``eval_rows``, or None when off: no evaluation
    (``evaluating`` false), or ``off``, why the parallel mode cannot generate (logged)."""
    k = cfg.train.eval_samples
    if not k or not evaluating:
        return None
    if off:
        log(off)
        return None
    return EvalSamples(sample_prompts(eval_rows, k), SampleWriter(cfg.output_dir, tokenizer),
                       max_new_tokens=cfg.train.sample_max_new_tokens, device=device)
