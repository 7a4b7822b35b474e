"""One parallel mode over many model families, under the launcher: for each family in turn a
:class:`KTOTrainer` is built the way ``launch/train_kto.py`` builds it (policy *and* reference), or
refused at start-up with one megakto error. A trained cell scores a fixed probe of rows with the
policy and the reference before and after 2 optimizer steps, checkpoints, exports, and rank 0 scores
the same rows with the untrained model folder and with the export, each run whole in this process
(padded rows, full logits). Rank 0 writes OUT/<family>.json.

    --mode zero3 | zero3_cache | tp2 | tp2_cache | pp2 | lora   (2 ranks each)
"""

import argparse
import gc
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from megakto.config import load_config  # noqa: E402
from megakto.data.collate import collate  # noqa: E402
from megakto.distributed import comm, engine  # noqa: E402
from megakto.errors import MegaktoError  # noqa: E402
from megakto.model.forward import completion_logps  # noqa: E402
from megakto.trainer import KTOTrainer  # noqa: E402

# (DeepSpeed JSON, overrides) of each mode; every cell also gets the overrides of cell_overrides().
MODES = {
    "zero3": ("ds_configs/zero3.json", {}),
    "zero3_cache": ("ds_configs/zero3.json", {"ref.mode": "cache"}),
    "tp2": ("ds_configs/zero3.json", {"parallel.tp_size": 2}),
    "tp2_cache": ("ds_configs/zero3.json", {"parallel.tp_size": 2, "ref.mode": "cache"}),
    "pp2": ("ds_configs/zero1.json", {"parallel.pp_size": 2}),
    "lora": ("ds_configs/zero3.json", {"model.lora.r": 4}),
}


def cell_overrides(mode: str, model: str, data: str, out: str) -> list[str]:
    values = {"model.path": model, "data.train_files": data, "data.max_length": 48, "train.global_batch_size": 8,
              "train.micro_batch_size": 2, "train.max_steps": 2, "train.log_every": 1, "optim.lr": 1e-3,
              "optim.schedule": "constant", "checkpoint.every_steps": 2, "train.export_hf": "true",
              "train.health_checks": "false", "dist.timeout_minutes": 2, "ref.cache_dir": os.path.join(out, "ref_cache"), "output_dir": out,
              **MODES[mode][1]}
    return [f"{k}={v}" for k, v in values.items()]


def whole_logps(folder: str, probe) -> torch.Tensor:
    """The probe's completion log-probs of the model in ``folder``, whole, in this process."""
    with engine.outside_zero3():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            return completion_logps(model, collate(probe, pad_id=3))[0]


def run_cell(mode: str, family: str, models: str, data: str, out: str) -> dict:
    cfg = load_config(None, cell_overrides(mode, os.path.join(models, family), data, os.path.join(out, family)))
    try:
        trainer = KTOTrainer(cfg, MODES[mode][0])
    except MegaktoError as err:  # every rank raises it (comm.fail_together): a start-up refusal
        return {"refused": str(err), "error_class": type(err).__name__}
    rows = trainer.train_rows.fetch(range(3))
    targets = [(list(p), list(c)) for p, c in zip(rows["prompt_ids"], rows["completion_ids"])]
    # Three targets and three mismatched pairs (prompt i with another row's completion).
    probe = targets + [(targets[i][0], targets[j][1]) for i, j in ((0, 1), (1, 2), (2, 0))]
    probe = probe if cfg.ref.mode != "cache" else targets  # the cache holds the run's own KL rows only

    def score():
        return (trainer.runner.score([probe])[0].float().cpu(), trainer.reference.score([probe])[0].float().cpu())

    policy_before, ref_before = score()
    history = trainer.train()
    policy_after, ref_after = score()
    result = {"logps_mode": cfg.model.logps, "attn": cfg.model.attn_implementation,
              "leaves": engine.zero3_leaf_classes(trainer.policy.module),
              "reference": type(trainer.reference).__name__, "steps": [h.metrics for h in history],
              "skipped": [h.skipped for h in history]}
    del trainer
    gc.collect()
    if comm.is_main():
        hf = os.path.join(out, family, "hf")
        result.update({"policy_before": policy_before.tolist(), "ref_before": ref_before.tolist(),
                       "policy_after": policy_after.tolist(), "ref_after": ref_after.tolist(),
                       "whole_before": whole_logps(os.path.join(models, family), probe).tolist(),
                       "export_after": whole_logps(hf, probe).tolist(),
                       "export_config": json.load(open(os.path.join(hf, "config.json")))["architectures"]})
    comm.barrier(group=comm.world_group())
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True, choices=sorted(MODES))
    parser.add_argument("--families", required=True)
    parser.add_argument("--models", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()
    engine.configure_cpu_threads()
    for family in args.families.split(","):
        try:
            result = run_cell(args.mode, family, args.models, args.data, args.out)
        except Exception:  # a crash inside DeepSpeed or transformers: recorded, then this rank stops
            with open(os.path.join(args.out, f"{family}.crash-rank{comm.rank()}"), "w") as f:
                f.write(traceback.format_exc())
            raise  # the ranks may no longer be in step: the launcher ends the others
        if comm.is_main():
            with open(os.path.join(args.out, f"{family}.json"), "w") as f:
                json.dump(result, f)


if __name__ == "__main__":
    comm.run_rank(main)  # ends the rank without the interpreter's teardown (comm.exit_process)
