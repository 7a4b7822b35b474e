"""ParallelDims: world = dp × tp × pp; global batch = micro × grad-accum × dp."""

import pytest

from megakto.config import load_config
from megakto.distributed.parallel import ParallelDims
from megakto.errors import ConfigError


@pytest.mark.parametrize(
    "world, tp, pp, gbs, mbs, dp, ga",
    [
        (1, 1, 1, 16, 4, 1, 4),  # 16 = 4 × 4 × 1
        (2, 1, 1, 16, 4, 2, 2),  # 16 = 4 × 2 × 2
        (4, 1, 1, 16, 4, 4, 1),  # 16 = 4 × 1 × 4
        (4, 2, 1, 16, 4, 2, 2),  # dp = 4 / 2 = 2; 16 = 4 × 2 × 2
        (4, 2, 2, 16, 4, 1, 4),  # dp = 4 / (2 × 2) = 1
        (2, 2, 1, 6, 2, 1, 3),  # dp = 1; 6 = 2 × 3 × 1
        (4, 1, 1, 24, 2, 4, 3),  # 24 = 2 × 3 × 4
    ],
)
def test_degrees(world, tp, pp, gbs, mbs, dp, ga):
    dims = ParallelDims(world_size=world, global_batch_size=gbs, micro_batch_size=mbs, tp=tp, pp=pp)
    assert (dims.dp, dims.grad_accum, dims.num_micro_batches) == (dp, ga, dp * ga)
    assert dims.micro_batch_size * dims.grad_accum * dims.dp == gbs


@pytest.mark.parametrize(
    "world, tp, gbs, mbs, expected",
    [
        (2, 1, 10, 4,
         "train.global_batch_size=10 is not divisible by train.micro_batch_size × data-parallel size "
         "= 4 × 2 = 8 (world 2 = dp 2 × tp 1 × pp 1); use a multiple of 8 such as 8 or 16"),
        (4, 1, 4, 4,
         "train.global_batch_size=4 is not divisible by train.micro_batch_size × data-parallel size "
         "= 4 × 4 = 16 (world 4 = dp 4 × tp 1 × pp 1); use a multiple of 16 such as 16"),
        (4, 2, 12, 4,
         "train.global_batch_size=12 is not divisible by train.micro_batch_size × data-parallel size "
         "= 4 × 2 = 8 (world 4 = dp 2 × tp 2 × pp 1); use a multiple of 8 such as 8 or 16"),
        (1, 1, 6, 4,
         "train.global_batch_size=6 is not divisible by train.micro_batch_size × data-parallel size "
         "= 4 × 1 = 4 (world 1 = dp 1 × tp 1 × pp 1); use a multiple of 4 such as 4 or 8"),
    ],
)
def test_batch_error_prints_the_arithmetic(world, tp, gbs, mbs, expected):
    with pytest.raises(ConfigError) as info:
        ParallelDims(world_size=world, global_batch_size=gbs, micro_batch_size=mbs, tp=tp)
    assert str(info.value) == expected


def test_world_not_divisible_by_model_parallel():
    with pytest.raises(ConfigError) as info:
        ParallelDims(world_size=3, global_batch_size=16, micro_batch_size=4, tp=2)
    assert str(info.value) == (
        "world size 3 is not divisible by tp × pp = 2 × 1 = 2; launch a multiple of 2 processes"
    )
    with pytest.raises(ConfigError, match=r"tp × pp = 2 × 2 = 4"):
        ParallelDims(world_size=6, global_batch_size=16, micro_batch_size=4, tp=2, pp=2)


@pytest.mark.parametrize("name", ["world_size", "global_batch_size", "micro_batch_size", "tp", "pp"])
def test_non_positive_degrees(name):
    kwargs = dict(world_size=2, global_batch_size=16, micro_batch_size=4, tp=1, pp=1)
    kwargs[name] = 0
    with pytest.raises(ConfigError, match=f"ParallelDims.{name} must be a positive int, got 0"):
        ParallelDims(**kwargs)


def test_from_config():
    cfg = load_config(None, ["model.path=m", "data.train_files=t.jsonl",
                             "train.global_batch_size=24", "train.micro_batch_size=3"])
    dims = ParallelDims.from_config(cfg, 4, tp=2)
    assert (dims.dp, dims.grad_accum, dims.num_micro_batches) == (2, 4, 8)  # 24 = 3 × 4 × 2


def test_mesh_coordinates_tp_innermost():
    # 4 ranks, tp 2: TP groups {0,1}, {2,3}; DP groups {0,2}, {1,3} (DeepSpeed AutoTP's layout).
    coords = {}
    for rank in range(4):
        d = ParallelDims(world_size=4, global_batch_size=16, micro_batch_size=4, tp=2, rank=rank)
        coords[rank] = (d.dp_rank, d.tp_rank, d.dp_group_ranks(), d.tp_group_ranks())
    assert coords == {0: (0, 0, [0, 2], [0, 1]), 1: (0, 1, [1, 3], [0, 1]),
                      2: (1, 0, [0, 2], [2, 3]), 3: (1, 1, [1, 3], [2, 3])}
    plain = ParallelDims(world_size=2, global_batch_size=16, micro_batch_size=4, rank=1)
    assert (plain.dp_rank, plain.tp_rank, plain.dp_group_ranks(), plain.tp_group_ranks()) == (1, 0, [0, 1], [1])


def test_mesh_coordinates_pipe_major():
    # 4 ranks, pp 2 (deepspeed.pipe's topology): stage 0 on {0,1}, stage 1 on {2,3}; the pipelines
    # are {0,2} and {1,3}, and the data-parallel groups are the ranks of one stage.
    coords = {}
    for rank in range(4):
        d = ParallelDims(world_size=4, global_batch_size=16, micro_batch_size=4, pp=2, rank=rank)
        coords[rank] = (d.dp_rank, d.pp_rank, d.dp_group_ranks(), d.pp_group_ranks())
    assert coords == {0: (0, 0, [0, 1], [0, 2]), 1: (1, 0, [0, 1], [1, 3]),
                      2: (0, 1, [2, 3], [0, 2]), 3: (1, 1, [2, 3], [1, 3])}
    two = ParallelDims(world_size=2, global_batch_size=16, micro_batch_size=4, pp=2, rank=1)
    assert (two.dp, two.grad_accum, two.dp_rank, two.pp_rank, two.pp_group_ranks()) == (1, 4, 0, 1, [0, 1])
    plain = ParallelDims(world_size=2, global_batch_size=16, micro_batch_size=4, rank=1)
    assert (plain.pp_rank, plain.pp_group_ranks()) == (0, [1])


def test_groups_attach_without_changing_the_degrees():
    d = ParallelDims(world_size=4, global_batch_size=16, micro_batch_size=4, tp=2, rank=3)
    g = d.with_groups(dp="dp-group", tp="tp-group", pp=None)
    assert (g.dp_group, g.tp_group, g.pp_group) == ("dp-group", "tp-group", None)
    assert g == d and (g.dp, g.tp, g.rank) == (2, 2, 3)


def test_a_group_read_before_it_is_attached_is_an_error_not_the_world():
    """Unattached, there is no group to read: None would mean the world to torch.distributed."""
    d = ParallelDims(world_size=4, global_batch_size=16, micro_batch_size=4, tp=2, rank=3)
    for name in ("dp_group", "tp_group", "pp_group"):
        with pytest.raises(RuntimeError, match="read before they were attached"):
            getattr(d, name)


@pytest.mark.parametrize("tp, pp, groups, bad", [
    (2, 1, dict(dp="dp", tp=None, pp=None), "tp=None at tp degree 2"),
    (1, 2, dict(dp="dp", tp=None, pp=None), "pp=None at pp degree 2"),
    (1, 1, dict(dp="dp", tp="tp", pp=None), "tp='tp' at tp degree 1"),
    (1, 2, dict(dp="dp", tp="tp", pp="pp"), "tp='tp' at tp degree 1"),
])
def test_a_group_is_attached_exactly_where_its_degree_is_above_one(tp, pp, groups, bad):
    d = ParallelDims(world_size=4, global_batch_size=16, micro_batch_size=2, tp=tp, pp=pp)
    with pytest.raises(ValueError, match=bad):
        d.with_groups(**groups)
    with pytest.raises(TypeError):
        d.with_groups("dp", None)  # keywords only: no group by position, none by default


@pytest.mark.parametrize("rank", [-1, 4, True])
def test_rank_outside_the_world(rank):
    with pytest.raises(ConfigError, match=r"ParallelDims.rank must be in \[0, 4\)"):
        ParallelDims(world_size=4, global_batch_size=16, micro_batch_size=4, rank=rank)


def test_from_config_reads_parallel_section():
    cfg = load_config(None, ["model.path=m", "data.train_files=t.jsonl", "train.global_batch_size=16",
                             "train.micro_batch_size=4", "parallel.tp_size=2"])
    dims = ParallelDims.from_config(cfg, 4, rank=2)
    assert (dims.tp, dims.dp, dims.grad_accum, dims.dp_rank, dims.tp_rank) == (2, 2, 2, 1, 0)


@pytest.mark.parametrize("tp, pp, sp, firsts", [
    (1, 1, 1, [0, 1, 2, 3]),   # data parallel only: every rank holds rows of its own
    (2, 1, 1, [0, 2]),         # TP groups {0,1}, {2,3}
    (1, 2, 1, [0, 1]),         # stage 0 on {0,1}: the pipelines' first stages
    (1, 1, 2, [0, 2]),         # sequence groups {0,1}, {2,3}
])
def test_first_of_replica_is_one_rank_per_set_of_rows(tp, pp, sp, firsts):
    dims = [ParallelDims(world_size=4, global_batch_size=8, micro_batch_size=1, tp=tp, pp=pp, sp=sp, rank=r)
            for r in range(4)]
    assert [d.rank for d in dims if d.first_of_replica] == firsts
    assert sorted(d.dp_rank for d in dims if d.first_of_replica) == list(range(dims[0].dp))
