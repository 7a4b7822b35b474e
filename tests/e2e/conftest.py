import json
import os

import pytest

from tests.launcher import launch


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The built-in default, made once per session: tiny Llama folder and the sorting demo data."""
    from megakto._demo.data import write_demo_data
    from megakto._demo.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("assets")
    model = make_tiny_model(root / "model", seed=0)
    train, eval_ = write_demo_data(root / "data", n_train_prompts=400, n_eval_prompts=60, seed=0)
    return {"model": str(model), "train": str(train), "eval": str(eval_), "root": root}


def base_overrides(assets, out_dir, **extra):
    values = {
        "model.path": assets["model"],
        "data.train_files": assets["train"],
        "data.max_length": 64,
        "train.global_batch_size": 16,
        "train.micro_batch_size": 4,
        "train.max_steps": 3,
        "optim.lr": 3e-4,
        "optim.schedule": "constant",
        "output_dir": str(out_dir),
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def run_trainer(assets, out_dir, *, nproc, ds="ds_configs/zero3.json", timeout=420, **extra):
    """Train under the launcher with tests/e2e/run_trainer.py; returns (process, result dict)."""
    dump = os.path.join(out_dir, "dump")
    proc = launch("tests/e2e/run_trainer.py", ["--deepspeed", ds, "--dump", dump,
                                               *base_overrides(assets, out_dir, **extra)],
                  nproc=nproc, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(dump, "result.json")) as f:
        return proc, json.load(f)
