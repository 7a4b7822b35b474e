"""Run a script under the real DeepSpeed launcher, N CPU processes over gloo, each test on its own
port: DeepSpeed's per-node launcher (what the ``deepspeed`` command runs on each node), or the
``deepspeed`` command itself where a test runs a command as the README writes it. Never mocks
DeepSpeed or torch.distributed. The command line and environment come from
tools/_launch.py, which tools/bench.py uses too."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import _launch  # noqa: E402
from _launch import free_port, rank_env  # noqa: E402

__all__ = ["REPO", "free_port", "launch", "launcher_command", "load_script", "rank_env"]


def launcher_command(script: str, args: list[str], *, nproc: int, cli: bool = False) -> list[str]:
    """The per-node launcher's command line for ``script args`` on ``nproc`` ranks (``cli``: through
    the ``deepspeed`` command itself, as the README's commands run): tools/_launch.py."""
    return _launch.launcher_command(script, args, nproc=nproc, cli=cli)


def launch(script: str, args: list[str], *, nproc: int, timeout: float = 300, env: dict | None = None,
           cli: bool = False):
    """``script args`` on ``nproc`` ranks under DeepSpeed's per-node launcher (``cli``: under the
    ``deepspeed`` command, ``deepspeed --num_gpus N --master_port P script args``); returns the
    CompletedProcess."""
    return subprocess.run(launcher_command(os.path.join(REPO, script), args, nproc=nproc, cli=cli), cwd=REPO,
                          env=rank_env(env), capture_output=True, text=True, timeout=timeout)


def load_script(path: str, name: str):
    """Import the script at ``path`` (relative to the repository) as module ``name``, registered in
    ``sys.modules`` (dataclasses look their module up while a class is built), to test its parts."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
