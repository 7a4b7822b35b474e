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


# Six steps with a checkpoint every 3, evaluation at 0/3/6 and the HF export: the single-process run
# that the tensor- and pipeline-parallel runs are compared with.
LONG = {"train.max_steps": 6, "checkpoint.every_steps": 3, "checkpoint.keep_last": 4, "train.eval_every": 3,
        "train.eval_batch_size": 30, "train.export_hf": "true"}


@pytest.fixture(scope="session")
def single_long(assets, tmp_path_factory):
    """One process, ZeRO-3, :data:`LONG` with the eval split: (output dir, result)."""
    out = tmp_path_factory.mktemp("single_long")
    _, result = run_trainer(assets, out, nproc=1, **LONG, **{"data.eval_files": assets["eval"]})
    return out, result


def run_trainer(assets, out_dir, *, nproc, ds="ds_configs/zero3.json", timeout=420, trainer_args=(), **extra):
    """Train under the launcher with tests/e2e/run_trainer.py (``trainer_args``: its own flags before
    the overrides); returns (process, result dict)."""
    dump = os.path.join(out_dir, "dump")
    proc = launch("tests/e2e/run_trainer.py", ["--deepspeed", ds, "--dump", dump, *trainer_args,
                                               *base_overrides(assets, out_dir, **extra)],
                  nproc=nproc, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(dump, "result.json")) as f:
        return proc, json.load(f)
