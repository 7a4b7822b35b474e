"""tools/plan_memory.py prints the plan with the planner's stated accuracy beside its peak, as text
and as JSON (in this process, from the 32B recipe's config.json alone)."""

import json
import os
import re

from megakto.planning.accuracy import STATED_ACCURACY_PERCENT, accuracy_note
from tests.launcher import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = ["--config", "configs/qwen2.5-32b/one_node_offload.yaml", "--deepspeed",
          "configs/qwen2.5-32b/one_node_offload.json", "--world-size", "8", "--gpu-memory", "80"]


def test_plan_states_its_accuracy(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    tool = load_script("tools/plan_memory.py", "plan_memory")
    assert tool.main(RECIPE) == 0
    text = capsys.readouterr().out
    found = re.search(r"^peak per rank: (\d+\.\d\d) GiB \(GPU memory; (.*)\); host memory per node \(8 ranks\)",
                      text, re.M)
    assert found and found.group(2) == accuracy_note()
    assert tool.main([*RECIPE, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stated_accuracy_percent"] == STATED_ACCURACY_PERCENT
    assert f"{out['peak_bytes_per_rank'] / 2**30:.2f}" == found.group(1)
