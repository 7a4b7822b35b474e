"""build_ds_config / reference_ds_config / load_ds_json, and the shipped ds_configs/*.json."""

import copy
import json
import pathlib

import pytest

from megakto.config import load_config
from megakto.distributed.ds_config import (
    autotp_size,
    check_deepspeed_version,
    check_versions,
    build_ds_config,
    grad_accum_bytes,
    load_ds_json,
    reference_ds_config,
)
from megakto.distributed.parallel import ParallelDims
from megakto.errors import ConfigError

DS_DIR = pathlib.Path(__file__).resolve().parents[2] / "ds_configs"
SHIPPED = ["zero2.json", "zero3.json", "zero3_offload_optimizer.json"]
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _cfg(*overrides):
    return load_config(None, ["model.path=m", "data.train_files=t.jsonl", *overrides])


# world 2, global 16, micro 4 -> dp 2, grad-accum 16 / (4 × 2) = 2.
DIMS = ParallelDims(world_size=2, global_batch_size=16, micro_batch_size=4)


def _build_error(ds, cfg=None, dims=DIMS, bf16=False):
    with pytest.raises(ConfigError) as info:
        build_ds_config(ds, cfg or _cfg(), dims, bf16=bf16, source="ds_configs/x.json")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_fills_batch_clipping_and_precision():
    ds = {"zero_optimization": {"stage": 3, "overlap_comm": True}, "steps_per_print": 10}
    before = copy.deepcopy(ds)
    out = build_ds_config(ds, _cfg("optim.grad_clip=0.5"), DIMS, bf16=True)
    assert out == {
        "zero_optimization": {"stage": 3, "overlap_comm": True},
        "steps_per_print": 10,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 16,
        "gradient_clipping": 0.5,
        "bf16": {"enabled": True},
        "fp16": {"enabled": False},
        "data_types": {"grad_accum_dtype": "fp32"},  # bf16 under ZeRO-3: gradients summed in fp32
    }
    assert ds == before  # a new dict; the input is untouched
    out["zero_optimization"]["stage"] = 0
    assert ds["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize(
    "world, tp, gbs, mbs, want",
    [
        (1, 1, 16, 4, (4, 4, 16)),  # 16 = 4 × 4 × 1
        (4, 1, 16, 2, (2, 2, 16)),  # 16 = 2 × 2 × 4
        (4, 1, 8, 2, (2, 1, 8)),  # 8 = 2 × 1 × 4
    ],
)
def test_batch_fields_for_several_worlds(world, tp, gbs, mbs, want):
    dims = ParallelDims(world_size=world, global_batch_size=gbs, micro_batch_size=mbs, tp=tp)
    out = build_ds_config({}, _cfg(), dims, bf16=False)
    assert tuple(out[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                  "train_batch_size")) == want


def test_auto_and_agreeing_values_are_accepted():
    ds = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 1,  # int 1 == optim.grad_clip 1.0
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }
    out = build_ds_config(ds, _cfg(), DIMS, bf16=False)
    assert (out["train_batch_size"], out["gradient_accumulation_steps"]) == (16, 2)
    assert out["gradient_clipping"] == 1.0
    assert out["bf16"] == {"enabled": False} and out["fp16"] == {"enabled": False}


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("train_batch_size", 32,
         "ds_configs/x.json: train_batch_size=32 disagrees with train.global_batch_size=16 "
         "(= micro 4 × grad-accum 2 × dp 2); remove it from the JSON or make them agree"),
        ("train_micro_batch_size_per_gpu", 8,
         "ds_configs/x.json: train_micro_batch_size_per_gpu=8 disagrees with train.micro_batch_size=4; "
         "remove it from the JSON or make them agree"),
        ("gradient_accumulation_steps", 4,
         "ds_configs/x.json: gradient_accumulation_steps=4 disagrees with train.global_batch_size / "
         "(train.micro_batch_size × dp) = 16 / (4 × 2) = 2; remove it from the JSON or make them agree"),
        ("gradient_clipping", 0.5,
         "ds_configs/x.json: gradient_clipping=0.5 disagrees with optim.grad_clip=1.0; "
         "remove it from the JSON or make them agree"),
        ("bf16", {"enabled": True},
         "ds_configs/x.json: bf16.enabled=true disagrees with model.dtype=auto (bf16 off); "
         "remove it from the JSON or make them agree"),
    ],
)
def test_disagreement_prints_both_numbers(key, value, expected):
    assert _build_error({key: value}) == expected


def test_bf16_follows_model_dtype_when_not_given():
    out = build_ds_config({}, _cfg("model.dtype=bfloat16"), DIMS)
    assert out["bf16"] == {"enabled": True}
    out = build_ds_config({"bf16": {"enabled": False, "immediate_grad_update": True}},
                          _cfg("model.dtype=float32"), DIMS)
    assert out["bf16"] == {"enabled": False, "immediate_grad_update": True}


@pytest.mark.parametrize("stage, pp, bf16, want", [
    (3, 1, True, "fp32"),   # the flat partition buffer in fp32: 2 more bytes per parameter per rank
    (3, 1, False, None),    # fp32 weights: DeepSpeed's default, their own dtype
    (2, 1, True, None),     # ZeRO-1/2 and pipelines keep the model dtype (see _fill_grad_accum_dtype)
    (1, 1, True, None),
    (1, 2, True, None),
    (0, 2, True, None),
])
def test_grad_accum_dtype_is_fp32_for_bf16_under_zero3_only(stage, pp, bf16, want):
    dims = ParallelDims(world_size=2, global_batch_size=16, micro_batch_size=4, pp=pp)
    out = build_ds_config({"zero_optimization": {"stage": stage}}, _cfg(), dims, bf16=bf16)
    assert out.get("data_types", {}).get("grad_accum_dtype") == want
    assert grad_accum_bytes(out, bf16) == (4 if want == "fp32" or not bf16 else 2)


def test_grad_accum_dtype_in_the_json_wins_and_bad_ones_are_one_line():
    zero3, zero1 = {"zero_optimization": {"stage": 3}}, {"zero_optimization": {"stage": 1}}
    out = build_ds_config({**zero3, "data_types": {"grad_accum_dtype": "bf16"}}, _cfg(), DIMS, bf16=True)
    assert out["data_types"] == {"grad_accum_dtype": "bf16"} and grad_accum_bytes(out, True) == 2
    out = build_ds_config({**zero1, "data_types": {"grad_accum_dtype": "fp32"}}, _cfg(), DIMS, bf16=True)
    assert out["data_types"] == {"grad_accum_dtype": "fp32"}  # DeepSpeed's BF16_Optimizer, the user's choice
    out = build_ds_config({**zero1, "data_types": {"grad_accum_dtype": "auto"}}, _cfg(), DIMS, bf16=True)
    assert out["data_types"] == {}  # "auto": megakto's choice, here DeepSpeed's default
    assert _build_error({**zero3, "data_types": {"grad_accum_dtype": "fp16"}}, bf16=True) == (
        'ds_configs/x.json: data_types.grad_accum_dtype="fp16": allowed values are fp32 and bf16 (or remove it: '
        "fp32 under ZeRO-3 in bf16, the model's dtype otherwise)")
    assert _build_error({**zero3, "data_types": {"grad_accum_dtype": "bf16"}}) == (
        'ds_configs/x.json: data_types.grad_accum_dtype="bf16" with an fp32 model: DeepSpeed sums the gradients '
        "of fp32 weights in fp32 only; remove it")
    pp2 = ParallelDims(world_size=2, global_batch_size=16, micro_batch_size=4, pp=2)
    assert _build_error({"zero_optimization": {"stage": 0}, "data_types": {"grad_accum_dtype": "fp32"}},
                        dims=pp2, bf16=True) == (
        'ds_configs/x.json: data_types.grad_accum_dtype="fp32" with bf16 at ZeRO stage 0 (pipelines, pp=2): '
        "DeepSpeed has no fp32 gradient sum without a ZeRO optimizer; remove it or use ZeRO stage 1")
    assert _build_error({**zero3, "data_types": ["fp32"]}, bf16=True) == (
        'ds_configs/x.json: data_types must be a JSON object, got ["fp32"]')


def test_fp16_is_rejected():
    assert _build_error({"fp16": {"enabled": True}}) == (
        "ds_configs/x.json: fp16.enabled=true is not supported; use model.dtype=bfloat16 (or float32)"
    )


@pytest.mark.parametrize("section, names", [("optimizer", "optim.lr"), ("scheduler", "optim.schedule")])
def test_optimizer_and_scheduler_sections_are_rejected(section, names):
    msg = _build_error({section: {"type": "AdamW", "params": {}}})
    assert msg.startswith(f'ds_configs/x.json: remove the "{section}" section; megakto builds ')
    assert names in msg


def test_leftover_auto_is_rejected():
    # reduce_bucket_size and the other ZERO_AUTO_KEYS are filled here (test_zero_sizes_follow_the_device).
    msg = _build_error({"zero_optimization": {"stage": 3, "allgather_bucket_size": "auto"}})
    assert msg == (
        'ds_configs/x.json: zero_optimization.allgather_bucket_size is "auto", which only the Hugging '
        "Face Trainer fills in; give a number"
    )


def test_autotp_omits_train_batch_size():
    # world 4 = dp 2 × tp 2; DeepSpeed would check train_batch_size against 4 ranks, not dp 2.
    dims = ParallelDims(world_size=4, global_batch_size=16, micro_batch_size=4, tp=2)
    ds = {"zero_optimization": {"stage": 1}}
    assert autotp_size({"tensor_parallel": {"autotp_size": 2}}) == 2 and autotp_size({}) == 1
    out = build_ds_config(ds, _cfg(), dims, bf16=False)
    assert "train_batch_size" not in out
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) == (4, 2)
    out = build_ds_config({**ds, "train_batch_size": "auto"}, _cfg(), dims, bf16=False)
    assert "train_batch_size" not in out
    assert _build_error({**ds, "train_batch_size": 16}, dims=dims) == (
        "ds_configs/x.json: remove train_batch_size=16; with tensor_parallel.autotp_size=2 DeepSpeed "
        "counts all 4 ranks instead of dp 2, and megakto's global batch is "
        "train.global_batch_size=16 (= micro 4 × grad-accum 2 × dp 2)"
    )


def test_tensor_parallel_is_filled_from_parallel_tp_size():
    dims = ParallelDims(world_size=4, global_batch_size=16, micro_batch_size=4, tp=2)
    out = build_ds_config({"zero_optimization": {"stage": 3}}, _cfg(), dims, bf16=False)
    assert out["tensor_parallel"] == {"autotp_size": 2, "vocab_parallel_lm_head": True}
    # Other AutoTP settings in the JSON are kept; an agreeing size is fine.
    out = build_ds_config({"tensor_parallel": {"autotp_size": 2, "partition_config": {}}}, _cfg(), dims, bf16=False)
    assert out["tensor_parallel"] == {"autotp_size": 2, "partition_config": {}, "vocab_parallel_lm_head": True}
    assert "tensor_parallel" not in build_ds_config({}, _cfg(), DIMS, bf16=False)  # tp 1: nothing added
    out = build_ds_config({"tensor_parallel": {"autotp_size": "auto"}}, _cfg(), dims, bf16=False)
    assert out["tensor_parallel"] == {"autotp_size": 2, "vocab_parallel_lm_head": True}
    assert _build_error({"tensor_parallel": {"autotp_size": 2, "vocab_parallel_lm_head": False}}, dims=dims) == (
        "ds_configs/x.json: tensor_parallel.vocab_parallel_lm_head=false: megakto scores log-probs on each rank's "
        "vocabulary rows and needs it true; remove it"
    )


def test_autotp_size_must_match_parallel_tp_size():
    assert _build_error({"tensor_parallel": {"autotp_size": 2}}) == (
        "ds_configs/x.json: tensor_parallel.autotp_size=2 disagrees with parallel.tp_size=1 "
        "(world 2 = dp 2 × tp 1 × pp 1); remove it from the JSON (megakto fills it in) or make them agree"
    )
    dims = ParallelDims(world_size=4, global_batch_size=16, micro_batch_size=4, tp=4)
    assert _build_error({"tensor_parallel": {"autotp_size": 2}}, dims=dims).startswith(
        "ds_configs/x.json: tensor_parallel.autotp_size=2 disagrees with parallel.tp_size=4 (world 4 = dp 1 × tp 4")


@pytest.mark.parametrize("installed, ok", [("0.19.8", True), ("0.20.0+cu124", True), ("1.0", True),
                                           ("0.19.7", False), ("0.19.4", False), ("0.18.9", False),
                                           ("0.19.8rc1", False)])
def test_deepspeed_version_for_tensor_parallelism(installed, ok):
    check_deepspeed_version(1, installed="0.10.0")  # tp 1: any version
    if ok:
        check_deepspeed_version(2, installed=installed)
        return
    with pytest.raises(ConfigError) as info:
        check_deepspeed_version(2, installed=installed)
    assert str(info.value) == (
        f"parallel.tp_size=2 needs deepspeed >= 0.19.8 (AutoTP training with ZeRO-3, complete TP checkpoints, "
        f"a vocabulary-parallel output head), but {installed} is installed; pip install 'deepspeed>=0.19.8'")


@pytest.mark.parametrize("installed, ok", [("0.19.3", True), ("0.19.8", True), ("0.19.2", False),
                                           ("0.18.5", False), ("0.19.3rc1", False)])
def test_deepspeed_version_for_pipelines(installed, ok):
    """Before 0.19.3 every stage but the last scaled its gradients by the accumulation steps again."""
    if ok:
        check_deepspeed_version(1, 2, installed=installed)
        return
    with pytest.raises(ConfigError) as info:
        check_deepspeed_version(1, 2, installed=installed)
    assert str(info.value) == (
        f"parallel.pp_size=2 needs deepspeed >= 0.19.3 (earlier releases scale the gradients of every stage but "
        f"the last wrongly under gradient accumulation), but {installed} is installed; "
        "pip install 'deepspeed>=0.19.3'")


def test_pipeline_reference_config_is_zero0_without_offload():
    from megakto.distributed.ds_config import reference_ds_config

    policy = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 16,
              "bf16": {"enabled": False}, "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}
    ref = reference_ds_config(policy, "cpu", pipeline=True)
    assert ref["zero_optimization"] == {"stage": 0}
    assert ref["train_batch_size"] == 16 and ref["gradient_accumulation_steps"] == 2
    assert "optimizer" not in ref and "scheduler" not in ref


def test_pipeline_config_names_its_clipping_and_batch():
    """The pipeline engine applied its own clipping default only under ZeRO-1: megakto always writes
    gradient_clipping from optim.grad_clip, and the batch arithmetic counts dp = world / pp."""
    cfg = load_config(None, ["model.path=m", "data.train_files=t.jsonl", "train.global_batch_size=16",
                             "train.micro_batch_size=2", "parallel.pp_size=2", "optim.grad_clip=0.25"])
    dims = ParallelDims.from_config(cfg, 4, rank=3)
    for stage in (0, 1):
        out = build_ds_config({"zero_optimization": {"stage": stage}}, cfg, dims, bf16=False)
        assert out["gradient_clipping"] == 0.25
        assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) \
            == (16, 2, 4)  # dp 2
        assert "tensor_parallel" not in out


def test_pipeline_with_zero3_is_rejected():
    dims = ParallelDims(world_size=2, global_batch_size=16, micro_batch_size=4, pp=2)
    msg = _build_error({"zero_optimization": {"stage": 3}}, dims=dims)
    assert msg.startswith("ds_configs/x.json: zero_optimization.stage=3 cannot be combined with "
                          "pipeline parallelism (pp=2)")


def test_reference_config_offload_cpu_and_none():
    policy = build_ds_config(load_ds_json(str(DS_DIR / "zero3_offload_optimizer.json")), _cfg(), DIMS,
                             bf16=True)
    ref = reference_ds_config(policy, offload="cpu")
    assert ref == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 16,
        "bf16": {"enabled": True},
        "fp16": {"enabled": False},
        "steps_per_print": policy["steps_per_print"],
        "wall_clock_breakdown": False,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 10000,
            "offload_param": {"device": "cpu", "pin_memory": False},
        },
    }
    ref = reference_ds_config(policy, offload="none")
    assert ref["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 10000}
    for absent in ("optimizer", "scheduler", "gradient_clipping", "zero_force_ds_cpu_optimizer"):
        assert absent not in ref
    ref["bf16"]["enabled"] = False
    assert policy["bf16"]["enabled"] is True  # a copy, not shared
    with pytest.raises(ConfigError, match="ref.offload must be one of 'cpu', 'none', got 'gpu'"):
        reference_ds_config(policy, offload="gpu")


def test_reference_config_keeps_autotp_and_omitted_batch():
    dims = ParallelDims(world_size=4, global_batch_size=16, micro_batch_size=4, tp=2)
    policy = build_ds_config({}, _cfg(), dims, bf16=False)
    ref = reference_ds_config(policy, offload="none")
    assert ref["tensor_parallel"] == {"autotp_size": 2, "vocab_parallel_lm_head": True}
    assert "train_batch_size" not in ref


def test_load_ds_json_errors(tmp_path):
    missing = str(tmp_path / "none.json")
    with pytest.raises(ConfigError) as info:
        load_ds_json(missing)
    assert str(info.value) == f"DeepSpeed config not found: {missing}"
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 3,}\n}\n')
    with pytest.raises(ConfigError) as info:
        load_ds_json(str(bad))
    assert str(info.value) == (
        f"{bad} is not valid JSON: Expecting property name enclosed in double quotes at line 2 column 36"
    )
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ConfigError) as info:
        load_ds_json(str(arr))
    assert str(info.value) == f"{arr} must hold a JSON object of DeepSpeed settings, got list"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_hold_only_deepspeed_settings(name):
    ds = load_ds_json(str(DS_DIR / name))
    assert json.loads((DS_DIR / name).read_text()) == ds
    for key in BATCH_KEYS + ("optimizer", "scheduler", "gradient_clipping", "bf16", "fp16"):
        assert key not in ds, key
    assert ds["wall_clock_breakdown"] is False and ds["steps_per_print"] >= 10**6
    out = build_ds_config(ds, _cfg(), DIMS, bf16=False, source=name)
    assert (out["train_batch_size"], out["gradient_accumulation_steps"]) == (16, 2)


def test_shipped_zero_settings():
    z2 = load_ds_json(str(DS_DIR / "zero2.json"))["zero_optimization"]
    z3 = load_ds_json(str(DS_DIR / "zero3.json"))["zero_optimization"]
    z3o = load_ds_json(str(DS_DIR / "zero3_offload_optimizer.json"))
    assert z2["stage"] == 2 and z3["stage"] == 3
    assert z3["stage3_gather_16bit_weights_on_model_save"] is True
    assert z3["stage3_param_persistence_threshold"] == 10000
    assert z3["overlap_comm"] is True and z3["contiguous_gradients"] is True
    # Same ZeRO-3 settings plus optimizer offload; torch AdamW is allowed on the offloaded states.
    assert {k: v for k, v in z3o["zero_optimization"].items() if k != "offload_optimizer"} == z3
    assert z3o["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert z3o["zero_force_ds_cpu_optimizer"] is False


# ----------------------------------------------------------------------------- sizes for the device

REPO = DS_DIR.parent


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload_optimizer.json"])
def test_zero_sizes_follow_the_device(name):
    """The shipped ZeRO-3 JSONs leave the bucket and sub-group sizes "auto": the CPU caps on CPU, sizes
    from the hidden size on GPU (Qwen2.5-32B: 5120² = 26,214,400), DeepSpeed's 1e9 sub-groups."""
    ds = load_ds_json(str(DS_DIR / name))
    cpu = build_ds_config(ds, _cfg(), DIMS, bf16=False, on_gpu=False)["zero_optimization"]
    assert {k: cpu[k] for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "sub_group_size")} == {
        "reduce_bucket_size": 10_000_000, "stage3_prefetch_bucket_size": 10_000_000, "sub_group_size": 10_000_000}
    gpu = build_ds_config(ds, _cfg(), DIMS, bf16=True, on_gpu=True, hidden_size=5120)["zero_optimization"]
    assert gpu["reduce_bucket_size"] == 26_214_400
    assert gpu["stage3_prefetch_bucket_size"] == 23_592_960  # int(0.9 × 5120²)
    assert gpu["sub_group_size"] == 1_000_000_000
    assert gpu["stage3_param_persistence_threshold"] == cpu["stage3_param_persistence_threshold"] == 10000  # as written
    assert ds["zero_optimization"]["reduce_bucket_size"] == "auto"  # the input is not changed
    # GPU lint: no shipped ZeRO-3 JSON keeps a CPU cap on GPU, even for a 4096-wide (7B) model.
    small = build_ds_config(ds, _cfg(), DIMS, bf16=True, on_gpu=True, hidden_size=4096)["zero_optimization"]
    assert min(small[k] for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "sub_group_size")) > 10 ** 7


def test_a_number_in_the_json_wins_and_auto_persistence_scales():
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e7, "sub_group_size": "auto",
                                "stage3_param_persistence_threshold": "auto"}}
    zero = build_ds_config(ds, _cfg(), DIMS, bf16=True, on_gpu=True, hidden_size=64)["zero_optimization"]
    assert zero == {"stage": 3, "reduce_bucket_size": 5e7, "sub_group_size": 1_000_000_000,
                    "stage3_param_persistence_threshold": 640}
    zero = build_ds_config(ds, _cfg(), DIMS, bf16=False)["zero_optimization"]  # CPU, the default
    assert zero == {"stage": 3, "reduce_bucket_size": 5e7, "sub_group_size": 10_000_000,
                    "stage3_param_persistence_threshold": 10_000}
    # Absent keys stay absent: DeepSpeed's own defaults apply.
    assert build_ds_config({"zero_optimization": {"stage": 3}}, _cfg(), DIMS, bf16=True, on_gpu=True,
                           hidden_size=64)["zero_optimization"] == {"stage": 3}


def test_auto_sizes_on_gpu_need_the_hidden_size():
    with pytest.raises(ConfigError) as info:
        build_ds_config({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto"}}, _cfg(), DIMS,
                        bf16=True, on_gpu=True, source="ds_configs/x.json")
    assert str(info.value) == ('ds_configs/x.json: zero_optimization.stage3_prefetch_bucket_size="auto" is sized from '
                               "the model's hidden_size on GPU, and none is known here; give a number")


def test_check_run_sizes_zero3_from_model_paths_config_on_gpu(tmp_path, monkeypatch):
    """What the trainer builds at start-up: on GPU the hidden size comes from model.path's config.json."""
    from megakto.startup import check_run

    monkeypatch.chdir(REPO)
    cfg = _cfg("model.path=configs/models/qwen2.5-32b", f"output_dir={tmp_path}", "train.global_batch_size=64",
               "train.micro_batch_size=1")
    zero = {}
    for on_gpu in (True, False):
        checked = check_run(cfg, "ds_configs/zero3.json", world_size=8, rank=0, bf16=True, on_gpu=on_gpu)
        zero[on_gpu] = checked.ds_config["zero_optimization"]
    assert (zero[True]["reduce_bucket_size"], zero[True]["stage3_prefetch_bucket_size"]) == (26_214_400, 23_592_960)
    assert (zero[False]["reduce_bucket_size"], zero[False]["stage3_prefetch_bucket_size"]) == (10_000_000, 10_000_000)


def test_reference_offload_is_pinned_on_gpu_only():
    policy = build_ds_config(load_ds_json(str(DS_DIR / "zero3.json")), _cfg(), DIMS, bf16=True, on_gpu=True,
                             hidden_size=64)
    assert reference_ds_config(policy, "cpu", on_gpu=True)["zero_optimization"]["offload_param"] == {
        "device": "cpu", "pin_memory": True}
    assert reference_ds_config(policy, "cpu")["zero_optimization"]["offload_param"]["pin_memory"] is False
    assert "offload_param" not in reference_ds_config(policy, "none", on_gpu=True)["zero_optimization"]


def test_host_offload():
    from megakto.distributed.ds_config import host_offload

    assert host_offload(load_ds_json(str(DS_DIR / "zero3_offload_optimizer.json")))
    assert not host_offload(load_ds_json(str(DS_DIR / "zero3.json")))
    assert host_offload({"zero_optimization": {"offload_param": {"device": "nvme"}}})
    assert not host_offload({"zero_optimization": {"offload_param": {"device": "none"}}})


# ----------------------------------------------------------------------------- version floors

SUITE = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "deepspeed": "0.19.8"}


@pytest.mark.parametrize("package, version, message", [
    ("torch", "2.3.1", "megakto needs torch >= 2.4, < 2.15 (the range it is tested in), but 2.3.1 is installed; "
                       "pip install 'torch>=2.4,<2.15'"),
    ("torch", "2.15.0+cu128", "megakto needs torch >= 2.4, < 2.15 (the range it is tested in), but 2.15.0+cu128 is "
                              "installed; pip install 'torch>=2.4,<2.15'"),
    ("transformers", "4.57.1", "megakto needs transformers >= 5.0 (packed rows kept apart by masks built from "
                               "position_ids, models loaded with dtype=), but 4.57.1 is installed; "
                               "pip install 'transformers>=5.0'"),
    ("deepspeed", "0.18.3", "megakto needs deepspeed >= 0.19.2 (earlier releases cast the rotary inv_freq buffers to "
                            "bf16 under ZeRO-1/2), but 0.18.3 is installed; pip install 'deepspeed>=0.19.2'"),
])
def test_versions_below_the_floors_are_refused_in_one_line(package, version, message):
    check_versions(1, 1, installed=SUITE)  # what the suite runs passes, at every parallel degree
    check_versions(2, 2, installed=SUITE)
    check_versions(1, 1, installed={**SUITE, "torch": "2.4.0", "transformers": "5.0.0", "deepspeed": "0.19.2"})
    with pytest.raises(ConfigError) as info:
        check_versions(1, 1, installed={**SUITE, package: version})
    assert str(info.value) == message
    # The tensor- and pipeline-parallel floors still apply on top.
    with pytest.raises(ConfigError, match=r"^parallel.tp_size=2 needs deepspeed >= 0.19.8"):
        check_versions(2, 1, installed={**SUITE, "deepspeed": "0.19.4"})


def test_setup_py_floors_are_the_checked_ones_and_the_installed_versions_meet_them():
    """setup.py asks for at least what check_versions refuses below (deepspeed: the TP floor, which is
    also the release the suite runs); the environment running these tests passes the check."""
    import ast
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    from megakto.distributed.ds_config import MIN_DEEPSPEED, MIN_DEEPSPEED_TP, MIN_TRANSFORMERS, TORCH_RANGE

    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    requires = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "install_requires"))
    spec = {r.name: r.specifier for r in map(Requirement, requires)}
    assert str(spec["torch"]) in ("<2.15,>=2.4", ">=2.4,<2.15") and TORCH_RANGE == ("2.4", "2.15")
    assert str(spec["transformers"]) == f">={MIN_TRANSFORMERS}"
    assert str(spec["deepspeed"]) == f">={MIN_DEEPSPEED_TP}" and Version(MIN_DEEPSPEED_TP) >= Version(MIN_DEEPSPEED)
    for name in ("torch", "transformers", "deepspeed"):
        assert spec[name].contains(version(name), prereleases=True), (name, version(name))
    check_versions(2, 2)
