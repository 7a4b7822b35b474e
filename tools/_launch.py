"""Starting megakto processes on this machine, for the tests and tools/bench.py: a free port, the
``deepspeed`` launcher's command line, and the environment every CPU rank gets."""

from __future__ import annotations

import os
import socket
import sys

__all__ = ["free_port", "launcher_command", "rank_env"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for ``--master_port``/MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(script: str, args: list[str], *, nproc: int) -> list[str]:
    """``deepspeed --num_gpus N --master_port P script args`` through this interpreter."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(free_port()), script, *args]


def rank_env(extra: dict | None = None) -> dict:
    """This process's environment with one thread per rank and quiet libraries, then ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", **(extra or {})}
