"""Package boundaries, checked by parsing imports (no module is executed).

- ``megakto/kto`` and ``megakto/data`` never reach ``torch.distributed`` or ``deepspeed``, neither
  by import nor as an attribute (``torch.distributed.all_reduce``), nor through
  ``megakto.distributed``;
- ``megakto/model`` imports nothing from ``megakto.distributed`` or ``megakto.planning``: the model
  code is applied to from outside (the vocabulary-parallel reducers are passed in) and the memory
  planner reads the model's shape from it, never the other way round;
- in the whole package, only modules under ``megakto/distributed/`` import ``deepspeed`` or
  ``torch.distributed``;
- in the package, ``tools/`` and ``launch/``, exactly one module talks to ``torch.distributed``
  (``megakto/distributed/comm.py``), and only the private DeepSpeed layer
  (``megakto/distributed/_deepspeed/``) imports ``deepspeed``: its public facade
  ``megakto/distributed/engine.py`` re-exports names and imports ``deepspeed`` itself nowhere.

Not covered: imports built from strings (``importlib.import_module("deepspeed")``).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "megakto"

COLLECTIVES = ("torch.distributed", "deepspeed")
HIGHER_THAN_MODEL = ("megakto.distributed", "megakto.planning")


def _matches(name: str, prefixes) -> str | None:
    for p in prefixes:
        if name == p or name.startswith(p + "."):
            return p
    return None


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` (an attribute chain on a name) -> "a.b.c"; None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def forbidden_uses(source: str, package: str, forbidden, *, attributes: bool = False):
    """(line, name) for every import of a module under one of ``forbidden`` in ``source``.

    ``package`` is the dotted package the source lives in, to resolve relative imports.
    ``from a import b`` counts as importing both ``a`` and ``a.b`` (``b`` may be a submodule), so
    ``from torch import distributed`` is caught. With ``attributes``, dotted attribute chains such
    as ``torch.distributed.barrier()`` count too.
    """
    hits = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*"]
        elif attributes and isinstance(node, ast.Attribute):
            names = [_dotted(node) or ""]
        for name in names:
            if _matches(name, forbidden):
                hits.append((node.lineno, name))
    return sorted(set(hits))


def _modules(*subdirs, root=PKG):
    """(path, package) for every .py file under the given subfolders of ``root`` present now."""
    for sub in subdirs:
        for path in sorted((root / sub).rglob("*.py")) if (root / sub).is_dir() else []:
            package = ".".join(path.relative_to(ROOT).parent.parts)
            yield path, package


SYNTHETIC = '''\
"""Docstrings that say torch.distributed or deepspeed are fine."""
import torch
import torch.nn.functional as F
from torch import nn
import deepspeedish
import torch.distributed
import torch.distributed as dist
from torch import distributed
from torch import nn, distributed as d2
from torch.distributed import all_reduce
from torch.distributed.fsdp import FullyShardedDataParallel
import deepspeed
import deepspeed.comm as ds_comm
from deepspeed.runtime.zero import Init
from ..distributed import engine
from . import distributed
x = torch.distributed.get_rank()
y = torch.nn.functional.relu
'''


def test_checker_catches_every_import_form():
    hits = forbidden_uses(SYNTHETIC, "megakto.kto", COLLECTIVES + ("megakto.distributed",))
    lines = sorted({line for line, _ in hits})
    # Lines 1-5 are harmless; lines 6-14 each import torch.distributed or deepspeed; line 15
    # reaches megakto.distributed relatively; line 16 is megakto.kto.distributed (allowed).
    assert lines == [6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert (15, "megakto.distributed") in hits
    assert (9, "torch.distributed") in hits


def test_checker_attribute_mode_and_relative_resolution():
    hits = forbidden_uses(SYNTHETIC, "megakto.kto", ("torch.distributed",), attributes=True)
    assert (17, "torch.distributed.get_rank") in hits
    assert not any(line == 18 for line, _ in hits)
    # Seen from megakto/__init__.py, "from . import distributed" is megakto.distributed.
    assert forbidden_uses("from . import distributed\n", "megakto", ("megakto.distributed",)) == [
        (1, "megakto.distributed")
    ]
    assert forbidden_uses("import torch\nimport datasets\n", "megakto.data", COLLECTIVES) == []


def test_checker_finds_something_in_the_tree():
    """The walk is not vacuous: the package's own files are found and parsed."""
    found = [p.name for p, _ in _modules("kto")]
    assert {"loss.py", "kl.py", "logps.py", "weights.py", "__init__.py"} <= set(found)


@pytest.mark.parametrize(
    "path,package",
    list(_modules("kto", "data")),
    ids=lambda x: str(x.relative_to(ROOT)) if isinstance(x, Path) else "",
)
def test_math_and_data_never_touch_collectives(path, package):
    hits = forbidden_uses(
        path.read_text(), package, COLLECTIVES + ("megakto.distributed",), attributes=True
    )
    assert hits == [], f"{path.relative_to(ROOT)} reaches a collective: {hits}"


@pytest.mark.parametrize(
    "path,package",
    list(_modules("model")),
    ids=lambda x: str(x.relative_to(ROOT)) if isinstance(x, Path) else "",
)
def test_model_imports_nothing_from_higher_layers(path, package):
    hits = forbidden_uses(path.read_text(), package, HIGHER_THAN_MODEL)
    assert hits == [], f"{path.relative_to(ROOT)} imports from a higher layer: {hits}"


def test_model_boundary_is_not_vacuous():
    """The model walk finds the package's files, and the checker sees both layers' import forms."""
    assert {"forward.py", "meta.py", "shape.py"} <= {p.name for p, _ in _modules("model")}
    source = "from megakto.planning.shape import X\nfrom ..distributed import vocab_parallel\nimport megakto.kto\n"
    assert sorted({line for line, _ in forbidden_uses(source, "megakto.model", HIGHER_THAN_MODEL)}) == [1, 2]


def test_only_megakto_distributed_imports_collectives():
    offenders = []
    for path, package in _modules("."):
        if package == "megakto.distributed" or package.startswith("megakto.distributed."):
            continue
        for line, name in forbidden_uses(path.read_text(), package, COLLECTIVES):
            offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert offenders == []


def _all_python():
    yield from _modules(".")
    yield from _modules("tools", "launch", root=ROOT)


DEEPSPEED_LAYER = "megakto/distributed/_deepspeed/"


def test_one_layer_per_runtime():
    """torch.distributed in comm.py only, deepspeed in the private DeepSpeed layer only (not its
    facade engine.py), tools and launch included."""
    owners = {"torch.distributed": "megakto/distributed/comm.py", "deepspeed": DEEPSPEED_LAYER}

    def owned(rel: str, runtime: str) -> bool:
        owner = owners[runtime]
        return rel.startswith(owner) if owner.endswith("/") else rel == owner

    seen = {name: set() for name in owners}
    offenders = []
    files = list(_all_python())
    assert any(p.parent.name == "tools" for p, _ in files) and any(p.parent.name == "launch" for p, _ in files)
    for path, package in files:
        rel = str(path.relative_to(ROOT))
        for line, name in forbidden_uses(path.read_text(), package, COLLECTIVES, attributes=True):
            runtime = _matches(name, COLLECTIVES)
            seen[runtime].add(rel)
            if not owned(rel, runtime):
                offenders.append(f"{rel}:{line} uses {name}; only {owners[runtime]} may")
    assert offenders == []
    assert seen["torch.distributed"] == {owners["torch.distributed"]}
    # Every module of the layer that exists to wrap DeepSpeed does import it; the facade does not.
    wrappers = ("runtime", "loading", "engines", "generation", "checkpoint_io", "convert", "ulysses", "vocab_ops",
                "expert")
    layer = {f"{DEEPSPEED_LAYER}{m}.py" for m in wrappers}
    assert seen["deepspeed"] == layer


@pytest.mark.gloo
def test_import_megakto_does_not_load_deepspeed():
    """At run time too: ``import megakto`` (the KTO math) must not pull deepspeed in."""
    code = "import sys, megakto, megakto.kto; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
