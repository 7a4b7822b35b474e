"""The trainer never branches on a parallel degree and never reads a DeepSpeed engine attribute:
each parallel mode builds itself (megakto/runners/) and reports the step's engine outcome as an
``EngineOutcome``. Checked by parsing megakto/trainer.py and the step it runs, megakto/step.py
(nothing is executed)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "megakto"
TRAINER = PKG / "trainer.py"
STEP = PKG / "step.py"

DEGREES = {"tp", "pp", "sp"}
# DeepSpeed engine API a trainer would reach for; the runners own these.
ENGINE_ATTRIBUTES = {"skipped_steps", "get_global_grad_norm", "get_lr", "global_steps", "global_samples",
                     "train_batch", "eval_batch", "backward", "is_gradient_accumulation_boundary", "optimizer",
                     "lr_scheduler", "get_data_types", "grid", "module"}


def _degree_comparisons(tree: ast.AST) -> list[str]:
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                if isinstance(operand, ast.Attribute) and operand.attr in DEGREES:
                    hits.append(f"line {node.lineno}: {ast.unparse(node)}")
    return hits


def _engine_reads(tree: ast.AST) -> list[str]:
    return [f"line {node.lineno}: .{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in ENGINE_ATTRIBUTES]


def test_the_checks_catch_what_they_look_for():
    tree = ast.parse("if self.dims.pp > 1 or 1 < dims.tp:\n    lr = self.policy.get_lr()[0]\n"
                     "n = engine.skipped_steps\nm = self.policy.module")
    assert len(_degree_comparisons(tree)) == 2
    assert sorted(hit.split(": ")[1] for hit in _engine_reads(tree)) == [".get_lr", ".module", ".skipped_steps"]


@pytest.mark.parametrize("path", [TRAINER, STEP], ids=["trainer", "step"])
def test_the_trainer_has_no_mode_branch_and_reads_no_engine_attribute(path):
    tree = ast.parse(path.read_text())
    assert _degree_comparisons(tree) == []
    assert _engine_reads(tree) == []
