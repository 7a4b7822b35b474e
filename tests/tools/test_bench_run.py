"""tools/bench_run.py's own parts: the figures read off a run's log and their ratios against the
baseline. No training runs here except the one tiny end-to-end run, marked e2e."""

import json
import os
import subprocess
import sys

import pytest

from tests.launcher import REPO, load_script

bench_run = load_script("tools/bench_run.py", "megakto_tools_bench_run")

LOG = """[megakto 15:02:49] start-up 6.8 s: checks 3.3 s, data 0.8 s (of it train tokenizer checks 0.03 s ...)
[megakto 15:02:50] evaluation at step 0: 0.91 s, samples 0.30 s; no step yet; since training began 0.9 s
[megakto 15:02:55] evaluation at step 10: 0.35 s, samples 0.26 s; a step takes 0.21 s (mean of 10); ...
[megakto 15:03:04] steps: 20 in 4.4 s: the first 0.45 s, then 0.21 s each (mean of 19)
[megakto 15:03:04] final phase 1.2 s: evaluation 0.4 s, samples 0.3 s, checkpoint 0.5 s (of it hashing 0.0 s)
"""


def test_figures_parsed_from_the_log():
    """Evaluations and samples are means over the evaluations: (0.91 + 0.35) / 2, (0.30 + 0.26) / 2."""
    figs = bench_run.parse_log(LOG)
    assert figs == pytest.approx({"startup_s": 6.8, "first_step_s": 0.45, "step_s": 0.21, "eval_s": 0.63,
                                  "samples_s": 0.28, "final_s": 1.2, "wall_s": None})


def test_a_log_without_samples_or_a_second_step():
    figs = bench_run.parse_log("evaluation at step 0: 0.5 s; no step yet\nsteps: 1 in 0.4 s: the first 0.40 s\n")
    assert (figs["eval_s"], figs["samples_s"], figs["first_step_s"], figs["step_s"]) == (0.5, None, 0.4, None)


def test_ratios_against_the_baseline():
    """now / baseline; None where either side has no figure or the baseline is 0."""
    now = {"startup_s": 6.0, "step_s": 0.3, "eval_s": 1.0, "samples_s": None, "wall_s": 30.0}
    base = {"startup_s": 4.0, "step_s": 0.2, "eval_s": 0.0, "samples_s": 0.3}
    r = bench_run.ratios(now, base)
    assert r["startup_s"] == 1.5 and r["step_s"] == pytest.approx(1.5)
    assert r["eval_s"] is None and r["samples_s"] is None and r["wall_s"] is None and r["first_step_s"] is None
    table = bench_run.table({"demo": now}, {"demo": base})
    assert "1.50x" in table.splitlines()[2]


def test_committed_baseline_has_every_figure_of_every_system():
    with open(os.path.join(REPO, "tools/bench_run_baseline.json")) as fh:
        base = json.load(fh)
    assert set(base["systems"]) == set(bench_run.SYSTEMS)
    assert all(set(figs) == set(bench_run.FIGURES) for figs in base["systems"].values())


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_one_tiny_run_end_to_end(tmp_path):
    """The demo system for 2 steps: every figure comes back and the ratio row is printed."""
    out = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, "tools/bench_run.py", "--systems", "demo", "--steps", "2", "--eval-every",
                           "1", "--port", "29911", "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figs = json.loads(out.read_text())["systems"]["demo"]
    assert all(figs[k] > 0 for k in bench_run.FIGURES), figs
    assert "x baseline" in proc.stdout
