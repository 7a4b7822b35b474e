"""What tools/quality_bench.py runs: a task's data in its two forms, the one scorer every system is
measured with, and the runs themselves (SFT start, megakto KTO/APO, TRL's DPO), each inside its own
worker process (``worker``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from _launch import free_port

__all__ = ["MAX_NEW_TOKENS", "write_task_data", "Scorer", "parse_method", "run_sft", "run_megakto", "run_dpo",
           "worker"]

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 24


# Data -------------------------------------------------------------------------------------------

def write_task_data(task_name: str, out: Path, n_train: int, n_eval: int, n_sft: int, seed: int) -> dict:
    """SFT demonstrations, unpaired rows, pairs and held-out examples of one task; the prompts of
    the three splits are disjoint."""
    from megakto._demo.tasks import get_task, make_examples

    task = get_task(task_name)
    examples = make_examples(task, n_train + n_eval + n_sft, seed=seed)
    train, held_out, sft = examples[:n_train], examples[n_train:n_train + n_eval], examples[n_train + n_eval:]
    out.mkdir(parents=True, exist_ok=True)
    paths = {"rows": out / "train_rows.jsonl", "pairs": out / "train_pairs.jsonl", "eval": out / "eval.json",
             "sft": out / "sft_rows.jsonl"}
    with paths["sft"].open("w") as f:
        for e in sft:
            f.write(json.dumps({"prompt": e.prompt, "completion": e.desirable, "label": True}) + "\n")
    with paths["rows"].open("w") as f:
        for e in train:
            f.write(json.dumps({"prompt": e.prompt, "completion": e.desirable, "label": True}) + "\n")
            f.write(json.dumps({"prompt": e.prompt, "completion": e.undesirable, "label": False}) + "\n")
    with paths["pairs"].open("w") as f:
        for e in train:  # TRL tokenizes prompt + completion as one text: the space keeps the same tokens
            f.write(json.dumps({"prompt": e.prompt, "chosen": " " + e.desirable, "rejected": " " + e.undesirable}) + "\n")
    paths["eval"].write_text(json.dumps([[e.prompt, e.desirable, e.undesirable] for e in held_out]))
    return {k: str(v) for k, v in paths.items()}


# One scorer for every system ----------------------------------------------------------------------

class Scorer:
    """Held-out reward accuracy and greedy pass rate of a Hugging Face causal LM, tokenized as
    megakto tokenizes rows (prompt with BOS, completion without, EOS appended)."""

    def __init__(self, model_dir: str, eval_path: str, task_name: str, batch: int = 100):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from megakto._demo.tasks import get_task

        self.torch, self.task, self.batch = torch, get_task(task_name), batch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.examples = json.loads(Path(eval_path).read_text())
        self.ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        enc = self.tok
        self.prompts = [enc(p)["input_ids"] for p, _, _ in self.examples]
        eos = enc.eos_token_id
        self.good = [enc(g, add_special_tokens=False)["input_ids"] + [eos] for _, g, _ in self.examples]
        self.bad = [enc(b, add_special_tokens=False)["input_ids"] + [eos] for _, _, b in self.examples]
        self.ref_good, self.ref_bad = self._logps(self.ref, self.good), self._logps(self.ref, self.bad)

    def _logps(self, model, completions):
        torch = self.torch
        out = []
        with torch.no_grad():
            for i in range(0, len(completions), self.batch):
                seqs = [p + c for p, c in zip(self.prompts[i:i + self.batch], completions[i:i + self.batch])]
                width = max(map(len, seqs))
                ids = torch.tensor([s + [self.tok.pad_token_id] * (width - len(s)) for s in seqs])
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
                logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
                token = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
                for j, (p, c) in enumerate(zip(self.prompts[i:i + self.batch], completions[i:i + self.batch])):
                    out.append(float(token[j, len(p) - 1:len(p) + len(c) - 1].double().sum()))
        return out

    def reward_accuracy(self, model) -> float:
        model.eval()
        good, bad = self._logps(model, self.good), self._logps(model, self.bad)
        score = 0.0
        for g, b, rg, rb in zip(good, bad, self.ref_good, self.ref_bad):
            dg, db = g - rg, b - rb
            score += 1.0 if dg > db else 0.5 if dg == db else 0.0
        return score / len(good)

    def pass_rate(self, model) -> float:
        torch = self.torch
        model.eval()
        passed = 0
        with torch.no_grad():
            for i in range(0, len(self.prompts), self.batch):
                prompts = self.prompts[i:i + self.batch]
                width = max(map(len, prompts))
                pad = self.tok.pad_token_id
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS,
                                     do_sample=False, pad_token_id=pad, eos_token_id=self.tok.eos_token_id)
                for j, row in enumerate(gen[:, width:].tolist()):
                    if self.tok.eos_token_id in row:
                        row = row[:row.index(self.tok.eos_token_id)]
                    else:
                        continue  # never stopped: not an answer
                    text = self.tok.decode(row, skip_special_tokens=True)
                    passed += self.task.check(self.examples[i + j][0], text)
        return passed / len(self.prompts)


# Runs (each in its own process) -------------------------------------------------------------------

def parse_method(method: str, lr: float) -> dict:
    """``kto``, ``apo``, ``dpo``, ``kto-lr3`` (3 x lr), ``kto@key=value@key=value``."""
    name, *overrides = method.split("@")
    lr_scale = 1.0
    if "-lr" in name:
        name, scale = name.split("-lr")
        lr_scale = float(scale)
    if name not in ("kto", "apo", "dpo"):
        raise SystemExit(f"error: --methods: unknown method {method!r} (kto, apo, dpo, kto-lrX, kto@key=value)")
    if name == "dpo" and overrides:
        raise SystemExit(f"error: --methods: {method!r}: overrides apply to megakto methods only")
    return {"kind": name, "lr": lr * lr_scale, "overrides": overrides}


def _megakto_config(spec: dict, loss_type: str, model_dir: str, rows: str, steps: int, lr: float, extra: list):
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import torch

    torch.set_num_threads(1)
    from megakto.config import load_config

    overrides = [
        f"model.path={model_dir}", f"data.train_files={rows}", "data.max_length=64",
        f"train.global_batch_size={spec['completions']}", f"train.micro_batch_size={spec['completions']}",
        f"train.max_steps={steps}", f"optim.lr={lr}", "optim.schedule=constant", "optim.warmup_steps=0",
        f"kto.loss_type={loss_type}", f"kto.beta={spec['beta']}", "ref.offload=none", f"output_dir={spec['out_dir']}",
        f"seed={spec['seed']}", "train.eval_samples=0", "train.health_checks=false", "train.log_every=1000000",
    ] + extra
    return load_config(None, overrides), overrides


def run_sft(spec: dict) -> dict:
    """The common starting point: a short SFT on another set of prompts' correct answers."""
    from megakto.trainer import KTOTrainer

    cfg, _ = _megakto_config(spec, "sft", spec["init_dir"], spec["data"]["sft"], spec["steps"], spec["lr"],
                             ["train.export_hf=true"])
    KTOTrainer(cfg, str(REPO / "ds_configs" / "zero1.json")).train()
    scorer = Scorer(str(Path(spec["out_dir"]) / "hf"), spec["data"]["eval"], spec["task"])
    return {"pass_rate": scorer.pass_rate(scorer.ref), "model_dir": str(Path(spec["out_dir"]) / "hf")}


def run_megakto(spec: dict) -> dict:
    from megakto.trainer import KTOTrainer

    m = spec["method"]
    loss_type = "kto" if m["kind"] == "kto" else "apo_zero_unpaired"
    cfg, overrides = _megakto_config(spec, loss_type, spec["model_dir"], spec["data"]["rows"], spec["steps"], m["lr"],
                                     m["overrides"])
    # Before the trainer: its ZeRO-3 reference engine makes transformers build later models partitioned.
    scorer = Scorer(spec["model_dir"], spec["data"]["eval"], spec["task"])
    trainer = KTOTrainer(cfg, str(REPO / "ds_configs" / "zero1.json"))
    model = trainer.policy.module
    curve, mech = [], {k: [] for k in ("kl", "kl/raw", "kl/clamped", "kl/z_ref", "kl/z_ref_over_reward",
                                       "kl/raw_change", "kto/slope/chosen", "kto/slope/rejected",
                                       "rewards/chosen", "rewards/rejected")}
    start = time.perf_counter()
    for step in range(1, spec["steps"] + 1):
        result = trainer.next_step()
        for k in mech:
            if k in result.metrics:
                mech[k].append((step, result.metrics[k]))
        if step % spec["eval_every"] == 0 or step == spec["steps"]:
            curve.append((step, scorer.reward_accuracy(model)))
            model.train()
    train_s = time.perf_counter() - start
    return {"curve": curve, "reward_accuracy": curve[-1][1], "pass_rate": scorer.pass_rate(model),
            "train_s": train_s, "mechanism": mech, "overrides": overrides}


def run_dpo(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    m = spec["method"]
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    pairs = datasets.load_dataset("json", data_files=spec["data"]["pairs"], split="train")
    scorer = Scorer(spec["model_dir"], spec["data"]["eval"], spec["task"])
    curve = []

    class Curve(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % spec["eval_every"] == 0 or state.global_step == spec["steps"]:
                curve.append((state.global_step, scorer.reward_accuracy(model)))
                model.train()

    config = DPOConfig(
        output_dir=spec["out_dir"], per_device_train_batch_size=spec["completions"] // 2, max_steps=spec["steps"],
        learning_rate=m["lr"], lr_scheduler_type="constant", warmup_steps=0, beta=spec["beta"], max_grad_norm=1.0,
        optim="adamw_torch", weight_decay=0.0, seed=spec["seed"], data_seed=spec["seed"], use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=10 ** 6, dataloader_num_workers=0, max_length=64,
        disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tok, callbacks=[Curve()])
    start = time.perf_counter()
    trainer.train()
    return {"curve": curve, "reward_accuracy": curve[-1][1], "pass_rate": scorer.pass_rate(model),
            "train_s": time.perf_counter() - start, "mechanism": {}}


def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    kind = spec["method"]["kind"]
    out = run_sft(spec) if kind == "sft" else run_dpo(spec) if kind == "dpo" else run_megakto(spec)
    Path(spec["result"]).write_text(json.dumps(out))
    return 0
