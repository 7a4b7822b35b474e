"""Under the launcher: ``launch/train_kto.py``'s own ``main`` with a stand-in trainer that only joins
the process group (DeepSpeed's ``init_distributed`` with ``dist.timeout_minutes``), then raises on
rank 1 alone, as a CUDA OOM would, while rank 0 waits for it in a collective. No model, no data:
the launch costs the interpreters' start and nothing else.

Into ``$MEGAKTO_TEST_DUMP`` every rank writes its pid; rank 1 the time it raised; a rank that tears
its process group down (``destroy_process_group``) writes ``destroyed_rank{r}``.

    _fails_alone_worker.py --deepspeed UNUSED.json [key=value ...]
"""

import os
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megakto.distributed import comm, engine  # noqa: E402
from tests.launcher import load_script  # noqa: E402

DUMP = os.environ["MEGAKTO_TEST_DUMP"]
RANK = os.environ.get("RANK", "0")


def _mark(name: str, text: str = "") -> None:
    with open(os.path.join(DUMP, name), "w") as f:
        f.write(text)


_destroy = dist.destroy_process_group


def _traced_destroy(*args, **kwargs):
    _mark(f"destroyed_rank{RANK}")
    return _destroy(*args, **kwargs)


class FailsAlone:
    """The trainer's surface (``__init__(cfg, deepspeed)``, ``train()``) and nothing of its work."""

    def __init__(self, cfg, deepspeed_config):
        engine.init_distributed(cfg.dist.timeout_minutes)

    def train(self):
        print(f"rank {comm.rank()}: process group: {comm.describe(group=comm.world_group())}", flush=True)
        comm.barrier(group=comm.world_group())  # both ranks are up
        if comm.rank() == 1:
            _mark("raised_rank1", repr(time.time()))
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected on rank 1 alone)")
        comm.all_reduce_sum(torch.ones(1), group=comm.world_group())  # rank 0: waits for a rank that never comes


if __name__ == "__main__":
    _mark(f"pid_rank{RANK}", str(os.getpid()))
    dist.destroy_process_group = _traced_destroy
    stand_in = types.ModuleType("megakto.trainer")
    stand_in.KTOTrainer = FailsAlone
    sys.modules["megakto.trainer"] = stand_in
    train_kto = load_script("launch/train_kto.py", "train_kto")
    status = train_kto.main([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    _mark(f"returned_rank{RANK}", str(status))
    sys.stdout.flush()
    os._exit(status)
