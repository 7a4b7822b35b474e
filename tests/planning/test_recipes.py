"""Every shipped 30B recipe dry-runs (in this process, no data: the model folder holds config.json
only) and fits its GPUs; a bad config fails in the dry run with the run's own one-line error."""

import glob
import os

import pytest

from megakto.errors import ModelError
from megakto.model.tp_checks import check_tp_config
from megakto.planning.accuracy import accuracy_note
from tests.launcher import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = {"one_node_offload": 8, "four_nodes": 32, "tp8_dp4": 32}


def _launcher():
    return load_script("launch/train_kto.py", "train_kto")


def _dry(name, world, *extra):
    folder = os.path.join(REPO, "configs", "qwen2.5-32b")
    return _launcher().main(["--dry-run", "--no-data", "--world-size", str(world), "--gpu-memory", "80",
                             "--config", os.path.join(folder, f"{name}.yaml"),
                             "--deepspeed", os.path.join(folder, f"{name}.json"), *extra])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_dry_runs_and_fits(name, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    assert _dry(name, RECIPES[name], f"output_dir={tmp_path}") == 0
    out = capsys.readouterr().out
    assert "parameters: embedding 0.779B, layers 31.207B, head 0.779B" in out
    assert f"; {accuracy_note()}); host memory per node" in out
    assert "fits: yes" in out and out.rstrip().endswith("dry run: ok")


def test_recipe_headers_state_the_plans_accuracy():
    """Every recipe whose header quotes its planned peak quotes the planner's stated accuracy with it."""
    headers = {}
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml"))):
        with open(path) as fh:
            headers[os.path.relpath(path, REPO)] = "".join(line for line in fh if line.startswith("#"))
    quoting = {name for name, text in headers.items() if "GiB peak" in text}
    assert len(quoting) == 7
    assert {name for name in quoting if f"Stated accuracy of the plan below: {accuracy_note()}." in headers[name]} == quoting


def test_bad_tp_size_fails_with_the_runs_error(capsys, monkeypatch, tmp_path):
    """tp 3 divides world 24 but not the 40 attention heads: the dry run prints exactly the line
    check_tp_config (what the trainer calls) raises."""
    monkeypatch.chdir(REPO)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(os.path.join("configs", "models", "qwen2.5-32b"))
    with pytest.raises(ModelError) as err:
        check_tp_config(config, 3, key="model.path=configs/models/qwen2.5-32b")
    assert _dry("tp8_dp4", 24, "parallel.tp_size=3", "train.global_batch_size=64", "train.micro_batch_size=2",
                f"output_dir={tmp_path}") == 1
    assert capsys.readouterr().err.strip() == f"megakto: error: {err.value}"


def test_output_dir_that_is_a_file_fails_as_in_a_run(capsys, monkeypatch, tmp_path):
    """The dry run calls the trainer's own checks (megakto.startup.check_run), output_dir first."""
    monkeypatch.chdir(REPO)
    from megakto.errors import ConfigError
    from megakto.startup import check_output_dir

    target = tmp_path / "out"
    target.write_text("")
    with pytest.raises(ConfigError) as err:
        check_output_dir(str(target))
    assert _dry("four_nodes", 32, f"output_dir={target}") == 1
    assert capsys.readouterr().err.strip() == f"megakto: error: {err.value}"


# The mixture-of-experts recipes: the planned figures their headers and docs/memory state.
MOE_RECIPES = {"one_node_ep8": (8, "68.28", "56.9"), "four_nodes_ep8": (32, "22.24", "14.2")}


@pytest.mark.parametrize("name", sorted(MOE_RECIPES))
def test_qwen3_30b_a3b_recipe_dry_runs_with_its_planned_memory(name, capsys, monkeypatch, tmp_path):
    """From config.json alone (parallel.ep_size reaches the plan through ParallelDims; the expert-parallel
    mode itself is not needed to plan): 16 of the 128 experts per GPU, the numbers in the recipe's header."""
    monkeypatch.chdir(REPO)
    world, peak, host = MOE_RECIPES[name]
    folder = os.path.join(REPO, "configs", "qwen3-30b-a3b")
    assert _launcher().main(["--dry-run", "--no-data", "--world-size", str(world), "--gpu-memory", "80",
                             "--config", os.path.join(folder, f"{name}.yaml"),
                             "--deepspeed", os.path.join(folder, f"{name}.json"), f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "parameters: embedding 0.311B, layers 29.910B, head 0.311B" in out and "experts 28.991B" in out
    assert f"world {world} = dp {world} x tp 1 x pp 1 (experts over ep 8), ZeRO-3" in out
    assert "policy weights (experts 16/128)" in out and "EP all-to-all buffers" in out
    assert (f"peak per rank: {peak} GiB (GPU memory; {accuracy_note()}); host memory per node (8 ranks): {host} GiB"
            in out)
    header = open(os.path.join(folder, f"{name}.yaml")).read()
    assert f"{peak} GiB peak" in header and f"{host} GiB per node" in header
    assert "fits: yes" in out and out.rstrip().endswith("dry run: ok")
