"""Starting megakto processes on this machine, for the tests and tools/bench.py: a free port, the
``deepspeed`` launcher's command line, and the environment every CPU rank gets."""

from __future__ import annotations

import base64
import json
import os
import socket
import sys

__all__ = ["free_port", "launcher_command", "rank_env"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for ``--master_port``/MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(script: str, args: list[str], *, nproc: int, cli: bool = True) -> list[str]:
    """``deepspeed --num_gpus N --master_port P script args`` through this interpreter. ``cli=False``:
    the command that command runs for a single node (deepspeed/launcher/runner.py builds it: the
    per-node launcher ``deepspeed.launcher.launch`` with the node's ranks in ``--world_info``, the
    environment unchanged), without the runner's own interpreter, which imports torch and deepspeed
    only to start it: 2.4 s a launch on the 2-core development machine, where the tests launch
    hundreds of times. The per-node launcher, which sets each rank's environment and ends every rank
    as soon as one fails, is the same."""
    port = str(free_port())
    if cli:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", port,
                script, *args]
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
            "--master_addr=127.0.0.1", f"--master_port={port}", "--log_level=info", script, *args]


def rank_env(extra: dict | None = None) -> dict:
    """This process's environment with one thread per rank and quiet libraries, then ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", **(extra or {})}
