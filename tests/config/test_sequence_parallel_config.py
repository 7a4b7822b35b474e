"""parallel.sp_size before anything loads: the config's cross-field rules, the mesh arithmetic
(world = dp × sp, sequence groups of consecutive ranks as DeepSpeed's Ulysses builds them) and the
DeepSpeed JSON (ZeRO-3 only, sequence_parallel_size filled in). Every refusal is one line."""

import pytest

from megakto.config import load_config
from megakto.distributed.ds_config import build_ds_config, reference_ds_config
from megakto.distributed.parallel import ParallelDims
from megakto.errors import ConfigError

REQUIRED = ["model.path=models/tiny", "data.train_files=train.jsonl"]


def _error(*overrides):
    with pytest.raises(ConfigError) as info:
        load_config(None, REQUIRED + list(overrides))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_default_is_off_and_two_is_accepted():
    assert load_config(None, REQUIRED).parallel.sp_size == 1
    cfg = load_config(None, REQUIRED + ["parallel.sp_size=2", "data.max_length=64"])
    assert cfg.parallel.sp_size == 2


@pytest.mark.parametrize("overrides, message", [
    (["parallel.sp_size=0"], "parallel.sp_size must be > 0, got 0"),
    (["parallel.sp_size=2", "parallel.tp_size=2"],
     "parallel.sp_size=2 with parallel.tp_size=2: DeepSpeed has no mesh of Ulysses sequence parallelism with AutoTP; "
     "use one of them"),
    (["parallel.sp_size=2", "parallel.pp_size=2"],
     "parallel.sp_size=2 with parallel.pp_size=2: DeepSpeed has no mesh of Ulysses sequence parallelism with "
     "pipelines; use one of them"),
    (["parallel.sp_size=2", "model.logps=full"],
     "model.logps=full with parallel.sp_size=2: each rank holds 1/2 of every row's positions and scores them with "
     "the chunked head; set model.logps=chunked (or auto)"),
    (["parallel.sp_size=4", "data.max_length=64", "data.max_tokens_per_row=90"],
     "data.max_tokens_per_row=90 is not divisible by parallel.sp_size=4: each packed row is cut into 4 equal "
     "sequence shards; use a multiple of 4 such as 92"),
    (["parallel.sp_size=2", "data.max_length=63"],
     "data.max_length (data.max_tokens_per_row: null)=63 is not divisible by parallel.sp_size=2: each packed row "
     "is cut into 2 equal sequence shards; use a multiple of 2 such as 64"),
    (["parallel.sp_size=2", "data.max_length=64", "model.lora.r=8"],
     "model.lora.r=8 with parallel.sp_size=2: the LoRA reference (the policy with its adapters off) does not run "
     "sequence-parallel yet; set parallel.sp_size=1 or model.lora.r=0"),
])
def test_refusals_are_one_line(overrides, message):
    assert _error(*overrides) == message


def test_unpacked_rows_need_no_divisible_budget():
    cfg = load_config(None, REQUIRED + ["parallel.sp_size=2", "data.max_length=63", "data.packing=false"])
    assert cfg.parallel.sp_size == 2  # pad_rows' width is padded to a multiple of sp at the cut


@pytest.mark.parametrize("world, rank, dp, dp_rank, sp_rank, dp_ranks, sp_ranks", [
    (2, 0, 1, 0, 0, [0], [0, 1]),
    (2, 1, 1, 0, 1, [1], [0, 1]),
    (4, 0, 2, 0, 0, [0, 2], [0, 1]),  # sequence groups {0,1}, {2,3}; data-parallel {0,2}, {1,3}
    (4, 1, 2, 0, 1, [1, 3], [0, 1]),
    (4, 2, 2, 1, 0, [0, 2], [2, 3]),
    (4, 3, 2, 1, 1, [1, 3], [2, 3]),
])
def test_mesh_sequence_groups_are_consecutive_ranks(world, rank, dp, dp_rank, sp_rank, dp_ranks, sp_ranks):
    dims = ParallelDims(world_size=world, global_batch_size=8, micro_batch_size=2, sp=2, rank=rank)
    assert (dims.dp, dims.dp_rank, dims.sp_rank, dims.tp_rank, dims.pp_rank) == (dp, dp_rank, sp_rank, 0, 0)
    assert dims.dp_group_ranks() == dp_ranks and dims.sp_group_ranks() == sp_ranks
    # 8 rows = micro 2 × grad-accum × dp: the sequence ranks add no rows.
    assert dims.grad_accum == 8 // (2 * dp) and dims.num_micro_batches == 8 // 2


def test_mesh_errors_print_the_arithmetic():
    with pytest.raises(ConfigError) as info:
        ParallelDims(world_size=3, global_batch_size=8, micro_batch_size=2, sp=2)
    assert str(info.value) == ("world size 3 is not divisible by tp × pp × sp = 1 × 1 × 2 = 2; launch a multiple "
                               "of 2 processes")
    with pytest.raises(ConfigError) as info:
        ParallelDims(world_size=4, global_batch_size=6, micro_batch_size=2, sp=2)
    assert str(info.value) == (
        "train.global_batch_size=6 is not divisible by train.micro_batch_size × data-parallel size = 2 × 2 = 4 "
        "(world 4 = dp 2 × tp 1 × pp 1 × sp 2); use a multiple of 4 such as 4 or 8")
    with pytest.raises(ConfigError, match=r"^parallel.sp_size=2 with parallel.tp_size=2, parallel.pp_size=1: "):
        ParallelDims(world_size=4, global_batch_size=8, micro_batch_size=2, sp=2, tp=2)
    dims = ParallelDims(world_size=4, global_batch_size=8, micro_batch_size=2, sp=2)
    assert dims.describe() == "world 4 = dp 2 × tp 1 × pp 1 × sp 2; global batch 8 = micro 2 × grad-accum 2 × dp 2"


def _ds(stage=3, **extra):
    cfg = load_config(None, REQUIRED + ["parallel.sp_size=2", "data.max_length=64", "train.global_batch_size=8",
                                        "train.micro_batch_size=2"])
    dims = ParallelDims.from_config(cfg, 4)
    return build_ds_config({"zero_optimization": {"stage": stage}, **extra}, cfg, dims, bf16=False,
                           source="ds_configs/x.json")


def test_deepspeed_json_gets_the_sequence_degree_and_the_data_parallel_batch():
    ds = _ds()
    # DeepSpeed divides the world by sequence_parallel_size: 8 rows = micro 2 × grad-accum 2 × dp 2.
    assert ds["sequence_parallel_size"] == 2
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert reference_ds_config(ds)["sequence_parallel_size"] == 2  # the frozen reference counts ranks alike
    assert _ds(sequence_parallel_size=2)["sequence_parallel_size"] == 2


@pytest.mark.parametrize("stage, extra, message", [
    (2, {}, "ds_configs/x.json: zero_optimization.stage=2 with parallel.sp_size=2: megakto's sequence parallelism "
     "runs under ZeRO-3 only; use ds_configs/zero3.json (or set zero_optimization.stage=3)"),
    (1, {}, "ds_configs/x.json: zero_optimization.stage=1 with parallel.sp_size=2: megakto's sequence parallelism "
     "runs under ZeRO-3 only; use ds_configs/zero3.json (or set zero_optimization.stage=3)"),
    (3, {"sequence_parallel_size": 4}, "ds_configs/x.json: sequence_parallel_size=4 disagrees with "
     "parallel.sp_size=2; remove it from the DeepSpeed JSON (megakto fills it in)"),
])
def test_deepspeed_json_refusals(stage, extra, message):
    with pytest.raises(ConfigError) as info:
        _ds(stage, **extra)
    assert str(info.value) == message
