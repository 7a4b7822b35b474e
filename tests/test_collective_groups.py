"""Every collective names its group, checked by parsing (no module is executed).

``megakto.distributed.comm`` takes ``group`` as a required keyword wherever a function takes one
(the signature test), and every call to such a function in ``megakto/``, ``tools/`` and ``launch/``
passes ``group=`` by name and never the literal ``None`` (the world is ``comm.world_group()``). A
reduction that silently fell back to the world is what turns a TP/PP/EP reduction wrong.

Calls are found through every name a module binds to ``comm`` or to one of its functions
(``from megakto.distributed import comm``, ``import megakto.distributed.comm as c``,
``from .comm import barrier``, and the module's own calls in ``comm.py``). A group function used
as a value instead of called (``gather=comm.all_gather_object``) is reported too: its group cannot
be read off the call site. Not covered: calls through ``getattr`` or ``**kwargs``-only call sites
(the latter are reported).

A group also travels through megakto's own functions before it reaches comm (``dp_group=``,
``tp_group=``): no function there gives such a parameter a default, and no call passes one the
literal ``None``, so a group is never the world by omission. At run time comm refuses
``group=None`` inside a process group (tests/distributed/test_comm.py), and
:class:`~megakto.distributed.parallel.ParallelDims` refuses to hand out a group before one is
attached (tests/distributed/test_parallel.py).
"""

import ast
from pathlib import Path

from tests.test_import_boundaries import _dotted

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "megakto"
COMM = PKG / "distributed" / "comm.py"
COMM_MODULE = "megakto.distributed.comm"


def group_functions(source: str) -> dict[str, ast.arguments]:
    """Public top-level functions of ``source`` that take a ``group`` parameter, with their arguments
    (comm's private helpers get their group from the public function that calls them)."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            a = node.args
            if any(arg.arg == "group" for arg in a.posonlyargs + a.args + a.kwonlyargs):
                found[node.name] = a
    return found


def _resolve(module: str | None, level: int, package: str) -> str:
    if not level:
        return module or ""
    parts = package.split(".")
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


def _bindings(tree: ast.AST, package: str, functions) -> tuple[set[str], dict[str, str]]:
    """(names bound to the comm module, {local name: comm function}) in one module."""
    modules, direct = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == COMM_MODULE and a.asname:
                    modules.add(a.asname)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, package)
            for a in node.names:
                if f"{base}.{a.name}" == COMM_MODULE:
                    modules.add(a.asname or a.name)
                elif base == COMM_MODULE and a.name in functions:
                    direct[a.asname or a.name] = a.name
    return modules, direct


def unnamed_groups(source: str, package: str, functions, *, own: bool = False) -> list[tuple[int, str]]:
    """(line, why) for every use of a comm group function in ``source`` that does not name its group.

    ``package``: the dotted package the source lives in (for relative imports); ``own``: the source
    is comm.py itself, whose bare calls of its own functions count."""
    tree = ast.parse(source)
    modules, direct = _bindings(tree, package, functions)
    if own:
        direct.update({name: name for name in functions})
    fully = {f"{COMM_MODULE}.{name}": name for name in functions}

    def target(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return direct.get(node.id)
        dotted = _dotted(node) if isinstance(node, ast.Attribute) else None
        if dotted is None:
            return None
        head, _, attr = dotted.rpartition(".")
        if head in modules and attr in functions:
            return attr
        return fully.get(dotted)

    hits, called = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = target(node.func)
            if name is None:
                continue
            called.add(id(node.func))
            group = next((k for k in node.keywords if k.arg == "group"), None)
            if group is None:
                hits.append((node.lineno, f"{name}() without group="))
            elif isinstance(group.value, ast.Constant) and group.value.value is None:
                hits.append((node.lineno, f"{name}(group=None)"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in called and target(node) is not None:
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                continue
            hits.append((node.lineno, f"{target(node)} used as a value: its group is not named at the call"))
    return sorted(set(hits))


def _files():
    for sub in (PKG, ROOT / "tools", ROOT / "launch"):
        for path in sorted(sub.rglob("*.py")):
            yield path, ".".join(path.relative_to(ROOT).parent.parts)


FUNCTIONS = group_functions(COMM.read_text())


def test_comm_takes_group_as_a_required_keyword():
    """Leaving the group out is a TypeError, not the world by default."""
    assert {"all_reduce_sum", "all_reduce_max", "all_reduce_dict", "any_rank", "barrier", "broadcast_object",
            "broadcast_tensor", "all_gather_object", "fail_together", "group_size", "group_rank",
            "group_ranks", "timeout_minutes", "describe"} <= set(FUNCTIONS)
    loose = []
    for name, a in FUNCTIONS.items():
        kwonly = {arg.arg: default for arg, default in zip(a.kwonlyargs, a.kw_defaults)}
        if "group" not in kwonly or kwonly["group"] is not None:
            loose.append(name)
    assert loose == [], f"comm functions whose group is positional or has a default: {loose}"


SYNTHETIC = '''\
from megakto.distributed import comm
from megakto.distributed import comm as c
import megakto.distributed.comm as cm
from megakto.distributed.comm import barrier, all_reduce_sum as ars, rank
comm.barrier(group=comm.world_group())
comm.barrier()
c.all_reduce_sum(t, group=None)
cm.any_rank(flag, group=g)
barrier()
ars(t, group=dp)
x = comm.all_gather_object
rank()
comm.rank()
with comm.fail_together():
    pass
comm.all_reduce_dict(v, **kw)
other.barrier()
'''


def test_checker_catches_every_form():
    hits = unnamed_groups(SYNTHETIC, "megakto.trainer", FUNCTIONS)
    assert [line for line, _ in hits] == [6, 7, 9, 11, 14, 16]
    assert (7, "all_reduce_sum(group=None)") in hits and (6, "barrier() without group=") in hits
    # Relative imports inside megakto/distributed, and comm.py's own bare calls.
    rel = "from . import comm\nfrom .comm import barrier\ncomm.barrier()\nbarrier()\n"
    assert [line for line, _ in unnamed_groups(rel, "megakto.distributed", FUNCTIONS)] == [3, 4]
    own = "def f(group):\n    return group_size(group=group) + group_size()\n"
    assert [line for line, _ in unnamed_groups(own, "megakto.distributed", FUNCTIONS, own=True)] == [2]


def test_every_collective_call_names_its_group():
    offenders, calls = [], 0
    for path, package in _files():
        source = path.read_text()
        own = path == COMM
        offenders += [f"{path.relative_to(ROOT)}:{line}: {why}"
                      for line, why in unnamed_groups(source, package, FUNCTIONS, own=own)]
        calls += source.count("group=")
    assert offenders == []
    assert calls > 40  # not vacuous: the package does call its collectives


def _is_group(name: str | None) -> bool:
    return name is not None and (name == "group" or name.endswith("_group"))


def loose_group_parameters(source: str) -> list[tuple[int, str]]:
    """(line, why) for every parameter named ``group``/``*_group`` with a default, and every call
    passing such a keyword the literal ``None``, in ``source``."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            positional = a.posonlyargs + a.args
            defaulted = list(zip(positional[len(positional) - len(a.defaults):], a.defaults))
            defaulted += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            name = getattr(node, "name", "lambda")
            hits += [(d.lineno, f"{name}({arg.arg}={ast.unparse(d)}): a group parameter with a default")
                     for arg, d in defaulted if _is_group(arg.arg)]
        elif isinstance(node, ast.Call):
            hits += [(node.lineno, f"{ast.unparse(node.func)}({k.arg}=None)") for k in node.keywords
                     if _is_group(k.arg) and isinstance(k.value, ast.Constant) and k.value.value is None]
    return sorted(set(hits))


def test_group_checker_catches_defaults_and_none_literals():
    source = ("def a(x, dp_group=None): pass\n"
              "def b(*, group=world): pass\n"
              "def c(x, *, tp_group, grouping=None, group_size=1): pass\n"
              "Evaluator(rows, dp_group=None)\n"
              "build(dp_group=dims.dp_group, tp=None, pp_group=g)\n"
              "f = lambda group=None: group\n")
    assert [line for line, _ in loose_group_parameters(source)] == [1, 2, 4, 6]


def test_no_group_parameter_has_a_default_and_no_call_passes_none():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {why}" for path, _ in _files()
                 for line, why in loose_group_parameters(path.read_text())]
    assert offenders == []
