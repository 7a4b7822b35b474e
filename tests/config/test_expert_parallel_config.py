"""parallel.ep_size before anything loads: the key, and the mesh arithmetic's refusals (expert
parallelism runs over data-parallel ranks: every rank holds its own rows). Each refusal is one line."""

import pytest

from megakto.config import load_config
from megakto.distributed.parallel import ParallelDims
from megakto.errors import ConfigError

REQUIRED = ["model.path=models/tiny", "data.train_files=train.jsonl"]

pytestmark = pytest.mark.unit


def test_default_is_off_and_two_is_accepted():
    assert load_config(None, REQUIRED).parallel.ep_size == 1
    cfg = load_config(None, REQUIRED + ["parallel.ep_size=2"])
    dims = ParallelDims.from_config(cfg, 4)
    assert (dims.ep, dims.dp, dims.grad_accum) == (2, 4, cfg.train.global_batch_size // (cfg.train.micro_batch_size * 4))
    assert "(experts over ep 2)" in dims.describe()


def test_zero_is_refused():
    with pytest.raises(ConfigError, match=r"^parallel.ep_size must be > 0, got 0$"):
        load_config(None, REQUIRED + ["parallel.ep_size=0"])


@pytest.mark.parametrize("kw, message", [
    (dict(ep=3), "world size 4 is not divisible by parallel.ep_size=3; launch a multiple of 3 processes"),
    (dict(ep=2, tp=2), "parallel.ep_size=2 with parallel.tp_size=2, parallel.pp_size=1, parallel.sp_size=1: expert "
     "parallelism runs over data-parallel ranks only; set the other degrees to 1"),
    (dict(ep=2, sp=2), "parallel.ep_size=2 with parallel.tp_size=1, parallel.pp_size=1, parallel.sp_size=2: expert "
     "parallelism runs over data-parallel ranks only; set the other degrees to 1"),
])
def test_mesh_refusals_are_one_line(kw, message):
    with pytest.raises(ConfigError) as info:
        ParallelDims(world_size=4, global_batch_size=8, micro_batch_size=2, **kw)
    assert str(info.value) == message
