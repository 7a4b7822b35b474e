#!/usr/bin/env python
"""Alignment quality on verifiable tasks: megakto KTO and apo_zero_unpaired against TRL's DPOTrainer.

    python tools/quality_bench.py [--tasks sort,copy,add] [--methods kto,apo,dpo] [--betas 0.1,0.5] \
        [--init sft|random] [--steps 600] [--lr 1e-4] [--completions 8] [--jobs 2] [--out outputs/quality_bench]

Needs TRL for the DPO runs (``pip install trl``; measured with 1.16.0). For every task of
megakto._demo.tasks it writes ``--train-prompts`` prompts, each with one desirable and one
undesirable completion, in two forms of the same data: unpaired rows (prompt, completion, label;
two per prompt, for KTO) and pairs (prompt, chosen, rejected; for DPO). Every run of a task starts
from the same model, which is also its reference: with ``--init sft`` (the default, the paper's
pipeline) a random-init tiny Llama (tools/make_tiny_model.py) fine-tuned with megakto's SFT loss
on the correct answers of ``--sft-prompts`` other prompts for ``--sft-steps`` steps (reused by the
next invocation with the same settings and ``--out``); with ``--init random`` the random-init model
itself. Every run has the same budget: ``--steps`` optimizer steps of ``--completions``
completions each (KTO: that many rows; DPO: half as many pairs), the same constant learning rate,
AdamW, gradient clipping at 1, one process and one thread; ``--jobs`` runs at a time.

Measured on ``--eval-prompts`` held-out prompts, with one scorer for every system:

* reward accuracy: the share of prompts whose desirable completion gets the higher implied reward
  log pi(y|x) - log pi_ref(y|x) (ties 0.5), every ``--eval-every`` steps (the curves);
* pass rate: the share of greedy completions (up to 24 new tokens) that the task's checker accepts.
  Reward accuracy is not generation quality: a policy can rank the pair right and still write a
  wrong answer.

Methods: ``kto`` (eq. 7, z_ref from mismatched pairs), ``apo`` (kto.loss_type=apo_zero_unpaired,
no reference point), ``dpo`` (TRL DPOTrainer, sigmoid loss); ``kto@key=value`` runs KTO with
config overrides (e.g. ``kto@kto.kl_scope=microbatch``), ``kto-lrX`` KTO at X times the learning
rate. Prints a table; writes under ``--out`` ``results.json`` (every run's curve, final figures and,
for megakto runs, the per-step reference-point metrics), ``curves.png`` (held-out reward accuracy
against steps) and ``mechanism.png`` (KTO's z_ref against its rewards). Measures, never asserts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from _launch import free_port, rank_env  # noqa: E402
from _bench_measure import machine_info  # noqa: E402

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


# The driver -------------------------------------------------------------------------------------------

def _run_one(spec: dict, log_dir: Path, reuse: bool = False) -> dict:
    """One run in its own process; ``reuse``: the result of an earlier run of the same spec."""
    spec_path = log_dir / f"{spec['name']}.spec.json"
    if reuse and spec_path.is_file() and json.loads(spec_path.read_text()) == spec and Path(spec["result"]).is_file():
        return json.loads(Path(spec["result"]).read_text())
    spec_path.write_text(json.dumps(spec))
    shutil.rmtree(spec["out_dir"], ignore_errors=True)  # a fresh run: no earlier checkpoints to meet
    log = log_dir / f"{spec['name']}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], stdout=f, stderr=subprocess.STDOUT,
                              env=rank_env({"PYTHONPATH": str(REPO)}))
    wall = time.perf_counter() - start
    if proc.returncode or not Path(spec["result"]).is_file():
        tail = log.read_text().strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}; see {log}: " + " | ".join(tail), "wall_s": wall}
    return {**json.loads(Path(spec["result"]).read_text()), "wall_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sort,copy,add")
    p.add_argument("--methods", default="kto,apo,dpo")
    p.add_argument("--betas", default="0.1,0.5")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--completions", type=int, default=8, help="completions per optimizer step (even)")
    p.add_argument("--train-prompts", type=int, default=5000)
    p.add_argument("--eval-prompts", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--init", choices=("sft", "random"), default="sft",
                   help="sft: every run starts from a short SFT of the random-init model (the paper's pipeline); "
                   "random: from the random-init model itself")
    p.add_argument("--sft-prompts", type=int, default=2000, help="prompts of the SFT start (their correct answers)")
    p.add_argument("--sft-steps", default="sort=300,copy=1500,add=2500",
                   help="SFT steps per task (task=N,...), or one number for every task")
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--out", default="outputs/quality_bench")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # a subprocess of this tool: it ends without the interpreter's teardown
        from megakto.distributed import comm

        comm.run_rank(lambda: worker(args.worker))
    if args.completions < 2 or args.completions % 2:
        raise SystemExit("error: --completions must be even (DPO takes them as pairs)")
    tasks = [t for t in args.tasks.split(",") if t]
    betas = [float(b) for b in args.betas.split(",") if b]
    methods = {m: parse_method(m, args.lr) for m in args.methods.split(",") if m}
    if "dpo" in [m["kind"] for m in methods.values()]:
        try:
            importlib.import_module("trl")
        except Exception as err:
            raise SystemExit(f"error: the dpo runs need TRL ({err.__class__.__name__}: {err}): pip install "
                             "trl==1.16.0, or leave dpo out of --methods")

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    init_dir = out / f"tiny-model-h{args.hidden_size}-l{args.num_layers}"
    if not (init_dir / "config.json").is_file():
        from megakto._demo.tiny_model import make_tiny_model

        make_tiny_model(init_dir, hidden_size=args.hidden_size, num_layers=args.num_layers,
                        intermediate_size=2 * args.hidden_size, seed=args.seed)
    data = {t: write_task_data(t, out / "data" / t, args.train_prompts, args.eval_prompts, args.sft_prompts, args.seed)
            for t in tasks}
    runs = out / "runs"
    runs.mkdir(exist_ok=True)
    common = {"completions": args.completions, "eval_every": args.eval_every, "seed": args.seed, "beta": 0.1,
              "prompts": [args.train_prompts, args.eval_prompts, args.sft_prompts]}
    start = time.perf_counter()
    # 1. The starting point of every run of a task (policy and reference alike): a short SFT.
    sft_steps = _per_task(args.sft_steps, tasks)
    sft_specs = [{**common, "name": f"{t}-sft", "task": t, "method": {"kind": "sft"}, "init_dir": str(init_dir),
                  "data": data[t], "steps": sft_steps[t], "lr": args.sft_lr, "out_dir": str(runs / f"{t}-sft"),
                  "result": str(runs / f"{t}-sft.result.json"), "model": [args.hidden_size, args.num_layers]}
                 for t in tasks]
    if args.init == "random":
        bases = {t: {"model_dir": str(init_dir), "pass_rate": None} for t in tasks}
    else:
        with ThreadPoolExecutor(args.jobs) as pool:  # the same SFT as last time in this --out: reused
            bases = dict(zip(tasks, pool.map(lambda s: _run_one(s, runs, reuse=True), sft_specs)))
    for t, base in bases.items():
        if "error" in base:
            raise SystemExit(f"error: the SFT start of task {t} failed: {base['error']}")
    # 2. The runs.
    specs = []
    for t in tasks:
        for beta in betas:
            for label, m in methods.items():
                name = f"{t}-{label}-b{beta}".replace("@", "_").replace("=", "-").replace("/", "_")
                specs.append({**common, "name": name, "task": t, "label": label, "beta": beta, "method": m,
                              "model_dir": bases[t]["model_dir"], "data": data[t], "steps": args.steps,
                              "out_dir": str(runs / name), "result": str(runs / f"{name}.result.json")})
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda s: _run_one(s, runs), specs))
    wall = time.perf_counter() - start
    report = {"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "wall_s": wall,
              "machine": machine_info(threads=1),
              "sft_pass_rate": {t: b["pass_rate"] for t, b in bases.items()},
              "runs": [{**{k: s[k] for k in ("name", "task", "label", "beta")}, **r} for s, r in zip(specs, results)]}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    machine = report["machine"]
    print(f"\nmachine: {machine['cpu_model']}, {machine['cpus_usable']} usable cores; torch "
          f"{machine['versions']['torch']}, trl {machine['versions']['trl']}")
    print_table(report, tasks, betas, list(methods))
    plot(report, out / "curves.png", tasks, betas)
    plot_mechanism(report, out / "mechanism.png", tasks, betas)
    print(f"\n{len(specs)} runs in {wall / 60:.1f} min; {out / 'results.json'}, {out / 'curves.png'}, "
          f"{out / 'mechanism.png'}")
    return 0


def _per_task(value: str, tasks: list[str]) -> dict[str, int]:
    if "=" not in value:
        return {t: int(value) for t in tasks}
    given = dict(item.split("=") for item in value.split(","))
    missing = [t for t in tasks if t not in given]
    if missing:
        raise SystemExit(f"error: --sft-steps names no steps for {', '.join(missing)}")
    return {t: int(given[t]) for t in tasks}


def print_table(report: dict, tasks: list[str], betas: list[float], labels: list[str]) -> None:
    by = {(r["task"], r["label"], r["beta"]): r for r in report["runs"]}
    head = "| method | " + " | ".join(f"{t} β={b:g}" for t in tasks for b in betas) + " |"
    print("\nheld-out reward accuracy / greedy pass rate, after "
          f"{report['settings']['steps']} steps of {report['settings']['completions']} completions")
    print(head)
    print("|---" * (1 + len(tasks) * len(betas)) + "|")
    start = report["sft_pass_rate"]
    print("| start | " + " | ".join("0.5 / " + ("-" if start[t] is None else f"{start[t]:.2f}")
                                   for t in tasks for _ in betas) + " |")
    for label in labels:
        cells = []
        for t in tasks:
            for b in betas:
                r = by[(t, label, b)]
                cells.append(r["error"][:40] if "error" in r else f"{r['reward_accuracy']:.3f} / {r['pass_rate']:.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


def plot(report: dict, path: Path, tasks: list[str], betas: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(betas), len(tasks), figsize=(4 * len(tasks), 3 * len(betas)), squeeze=False)
    for i, b in enumerate(betas):
        for j, t in enumerate(tasks):
            ax = axes[i][j]
            for r in report["runs"]:
                if r["task"] == t and r["beta"] == b and "curve" in r:
                    steps, acc = zip(*[(0, 0.5), *r["curve"]])  # step 0: the policy is the reference
                    ax.plot(steps, acc, label=r["label"])
            ax.set_title(f"{t}, β={b:g}")
            ax.set_ylim(0.4, 1.0)
            ax.set_xlabel("step")
            ax.set_ylabel("held-out reward accuracy")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_mechanism(report: dict, path: Path, tasks: list[str], betas: list[float]) -> None:
    """Per task and beta, the first KTO run's reference point z_ref against its rewards (means over
    windows of 25 steps): where z_ref sits between the two classes' rewards, it eats the margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(betas), len(tasks), figsize=(4 * len(tasks), 3 * len(betas)), squeeze=False)
    for i, b in enumerate(betas):
        for j, t in enumerate(tasks):
            ax = axes[i][j]
            run = next((r for r in report["runs"] if r["task"] == t and r["beta"] == b
                        and r.get("mechanism", {}).get("kl/z_ref")), None)
            ax.set_title(f"{t}, β={b:g}" + (f", {run['label']}" if run else ": no KTO run"))
            if run is None:
                continue
            for key, label in (("rewards/chosen", "reward, desirable"), ("rewards/rejected", "reward, undesirable"),
                               ("kl/z_ref", "z_ref")):
                points = run["mechanism"].get(key, [])
                windows = [points[k:k + 25] for k in range(0, len(points), 25)]
                ax.plot([w[-1][0] for w in windows], [sum(v for _, v in w) / len(w) for w in windows], label=label)
            ax.axhline(0, color="grey", linewidth=0.5)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
