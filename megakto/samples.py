"""Eval samples: greedy completions of a few fixed held-out prompts from the policy and from the
reference, so a user sees what the numbers mean (TRL's ``generate_during_eval``).

Generation is Hugging Face's ``generate`` on the engine's module, all prompts in one call per model
(left-padded to the longest, the padding masked). Where the planner says the whole model fits on
one device, its weights are gathered once for the call
(:func:`~megakto.distributed.engine.gathered_for_generation`); otherwise ZeRO-3 gathers every layer
in every forward, one forward per generated token. Every rank generates the same prompts with
``synced_gpus=True`` (a rank that has finished keeps stepping until all have), so the collectives
match. Rank 0 writes ``output_dir/samples.jsonl`` (one line per prompt and evaluation) and a
TensorBoard text entry.

``train.eval_samples: null`` (the default) turns :data:`DEFAULT_PROMPTS` prompts on only where the
planner (megakto/planning/samples_cost.py) estimates that they cost under a few percent of the
training between two evaluations and the gathered model fits on one device; otherwise they are off
with one log line saying what they would cost and how to turn them on. A number is taken as asked.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from megakto.data.split import TokenizedSplit
from megakto.distributed import comm, engine
from megakto.planning.samples_cost import SamplesCost, SamplesWork, samples_cost
from megakto.reference.scorers import AdapterOffReference
from megakto.runners.base import model_of

__all__ = ["DEFAULT_PROMPTS", "sample_prompts", "generate", "SampleWriter", "EvalSamples", "eval_samples",
           "planned_cost"]

DEFAULT_PROMPTS = 3  # train.eval_samples: null, where the planner says they are cheap


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
    """Greedy completion ids of each prompt, all in one ``generate`` call: the prompts left-padded
    to the longest with ``pad_id`` (masked, so each row sees only its own tokens), each completion
    cut after its first ``eos_id``. ``synced``: ZeRO-3 on several ranks, where every rank must take
    part in every forward."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    was_training = module.training
    module.eval()
    try:
        seq = module.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id, synced_gpus=synced)
    finally:
        module.train(was_training)
    out = []
    for row in seq[:, width:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]  # a finished row is padded to the longest
        out.append(row)
    return out


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
    reference at every evaluation; rank 0 writes them through ``writer``. ``gather``: each model's
    weights gathered once per call (the planner says the whole model fits on one device)."""

    def __init__(self, prompts: list[list[int]], writer: SampleWriter, *, max_new_tokens: int, device,
                 gather: bool = False):
        self.prompts, self.writer = prompts, writer
        self.max_new_tokens, self.device, self.gather = max_new_tokens, device, gather

    def _run(self, model_engine, *, adapter_off: bool = False) -> list[list[int]]:
        tok = self.writer.tokenizer
        with engine.gathered_for_generation(model_engine) if self.gather else nullcontext(model_of(model_engine)) as m:
            with m.disable_adapter() if adapter_off else nullcontext():
                return generate(m, self.prompts, max_new_tokens=self.max_new_tokens, pad_id=tok.pad_token_id,
                                eos_id=tok.eos_token_id, device=self.device, synced=comm.world_size() > 1)

    def __call__(self, step: int, policy, reference, log) -> None:
        """Greedy completions of the prompts from ``policy`` (the engine) and ``reference`` (every rank
        takes part: ZeRO-3 gathers collectively); rank 0 writes them and ``log`` (the run's logger)
        gets a text entry. A cached reference has no model, so its column stays empty."""
        policy_out = self._run(policy)
        ref_engine = getattr(reference, "engine", None)
        reference_out = self._run(ref_engine) if ref_engine is not None else None
        if isinstance(reference, AdapterOffReference):
            reference_out = self._run(policy, adapter_off=True)
        if comm.is_main():
            records = self.writer.write(step, self.prompts, policy_out, reference_out)
            log.text("samples", SampleWriter.markdown(records), step)


def eval_samples(cfg, eval_rows: TokenizedSplit | None, tokenizer, *, evaluating: bool, off: str | None, device,
                 log: Callable[[str], None],
                 cost: Callable[[list[list[int]]], SamplesCost] | None = None) -> EvalSamples | None:
    """The samples of ``train.eval_samples`` over ``eval_rows``, or None when off: set to 0, no
    evaluation (``evaluating`` false), ``off`` (why the parallel mode cannot generate; logged), or
    by default where ``cost`` (the planner's estimate for the prompts) says they are not cheap
    (logged with the figure). Without ``cost`` the weights are not gathered."""
    k = cfg.train.eval_samples
    if k == 0 or not evaluating:
        return None
    if off:
        log(off)
        return None
    prompts = sample_prompts(eval_rows, DEFAULT_PROMPTS if k is None else k)
    estimate = cost(prompts) if cost is not None and prompts else None
    n_new = cfg.train.sample_max_new_tokens
    what = f"{len(prompts)} prompts x up to {n_new} new tokens"
    if k is None and estimate is not None and not estimate.default_on:
        reason = "" if estimate.fits else f"; {estimate.why_not_gathered()}"
        log(f"eval samples: off by default for this model: {what} would cost {estimate.describe()}{reason}; "
            f"set train.eval_samples={DEFAULT_PROMPTS} to turn them on")
        return None
    gather = estimate is not None and estimate.fits
    if estimate is not None:
        how = ("each model's weights gathered once per call" if gather else
               f"not gathered: {estimate.why_not_gathered()}")
        log(f"eval samples: {what} per model at every evaluation ({how}; {estimate.describe()}); "
            "train.eval_samples=0 turns them off")
    return EvalSamples(prompts, SampleWriter(cfg.output_dir, tokenizer), max_new_tokens=n_new, device=device,
                       gather=gather)


def planned_cost(cfg, deepspeed: str, train_rows: TokenizedSplit, *, world_size: int,
                 on_gpu: bool) -> Callable[[list[list[int]]], SamplesCost]:
    """The planner's estimate of the samples of given prompts for this run (its model, DeepSpeed
    JSON, mesh and global batch of ``train_rows``' mean length), against one device's memory."""
    from megakto.distributed.ds_config import load_ds_json
    from megakto.model.meta import model_shape
    from megakto.planning import plan_memory
    from megakto.planning.inputs import plan_inputs

    models = 1 if cfg.kto.loss_type == "sft" or cfg.ref.mode == "cache" else 2

    def cost(prompts: list[list[int]]) -> SamplesCost:  # called only when samples may run
        shape = model_shape(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        inputs = plan_inputs(cfg, load_ds_json(deepspeed), shape, world_size=world_size, on_gpu=on_gpu,
                             source=deepspeed)
        lengths = train_rows.column_lengths("prompt_ids") + train_rows.column_lengths("completion_ids")
        work = SamplesWork(prompts=len(prompts), prompt_tokens=max(map(len, prompts)),
                           new_tokens=cfg.train.sample_max_new_tokens, models=models,
                           step_tokens=round(cfg.train.global_batch_size * float(lengths.mean())),
                           steps_between=cfg.train.eval_every or cfg.train.max_steps)
        return samples_cost(plan_memory(inputs), work, device_bytes=engine.device_memory_bytes())

    return cost
