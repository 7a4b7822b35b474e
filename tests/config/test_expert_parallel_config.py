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


# ---------------------------------------------------------------- the DeepSpeed section and the checks

def _dims(ep=2, world=2):
    return ParallelDims(world_size=world, global_batch_size=8, micro_batch_size=2, ep=ep)


def _cfg(*overrides):
    return load_config(None, REQUIRED + ["parallel.ep_size=2", *overrides])


def _ds_error(ds, *, on_gpu=False, preset="qwen3_moe"):
    from megakto.distributed.ds_config import build_ds_config

    with pytest.raises(ConfigError) as info:
        build_ds_config(ds, _cfg(), _dims(), bf16=False, on_gpu=on_gpu, expert_preset=preset, source="x.json")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_expert_parallel_section_is_filled_and_copied_to_the_reference():
    from megakto.distributed.ds_config import build_ds_config, reference_ds_config

    ds = build_ds_config({"zero_optimization": {"stage": 2}, "expert_parallel": {"use_grouped_mm": False}}, _cfg(),
                         _dims(), bf16=False, expert_preset="qwen3_moe")
    assert ds["expert_parallel"] == {"enabled": True, "autoep_size": 2, "preset_model": "qwen3_moe",
                                     "use_grouped_mm": False}
    assert reference_ds_config(ds)["expert_parallel"] == ds["expert_parallel"]
    off = build_ds_config({"zero_optimization": {"stage": 3}}, load_config(None, REQUIRED), _dims(ep=1), bf16=False)
    assert "expert_parallel" not in off


@pytest.mark.parametrize("section, message", [
    ({"autoep_size": 4}, "x.json: expert_parallel.autoep_size=4 disagrees with parallel.ep_size=2; remove it from the "
     "JSON (megakto fills it in) or make them agree"),
    ({"combine_impl": "fused_weighted_sum"}, 'x.json: expert_parallel.combine_impl="fused_weighted_sum" needs CUDA; '
     "remove it on CPU"),
    ({"comm_backend": "deepep"}, 'x.json: expert_parallel.comm_backend="deepep" needs CUDA; remove it on CPU'),
    ({"preset_model": "mixtral"}, 'x.json: expert_parallel.preset_model="mixtral" disagrees with the model\'s family '
     "(preset qwen3_moe); remove it (megakto fills it in)"),
])
def test_expert_parallel_section_refusals_are_one_line(section, message):
    assert _ds_error({"zero_optimization": {"stage": 3}, "expert_parallel": section}) == message


def test_enabled_in_the_json_without_ep_size_is_refused():
    from megakto.distributed.ds_config import build_ds_config

    with pytest.raises(ConfigError, match=r"^x.json: expert_parallel.enabled=true with parallel.ep_size=1; set "
                                          r"parallel.ep_size"):
        build_ds_config({"expert_parallel": {"enabled": True}}, load_config(None, REQUIRED), _dims(ep=1), bf16=False,
                        source="x.json")


def _tiny_config(family="qwen3_moe", **extra):
    from megakto._demo.tiny_model import family_config

    config = family_config(family, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=64)
    for key, value in extra.items():
        setattr(config, key, value)
    return config


def test_model_checks_name_the_key_and_the_presets():
    from megakto.distributed import engine
    from megakto.runners.expert import check_model

    assert check_model(_tiny_config(), _dims(), key="model.path", path="m") == "qwen3_moe"
    with pytest.raises(ConfigError) as info:
        check_model(_tiny_config(num_experts=6), _dims(ep=4, world=4), key="model.path", path="m")
    assert str(info.value) == ("parallel.ep_size=4 does not divide the 6 experts per layer of model.path=m (config.json "
                               "num_experts/num_local_experts/n_routed_experts); use a divisor of 6")
    with pytest.raises(ConfigError) as info:
        check_model(_tiny_config("llama"), _dims(), key="model.path", path="m")
    assert str(info.value) == (f"parallel.ep_size=2: model.path=m is a llama model, for which DeepSpeed has no AutoEP "
                               f"preset (it has: {', '.join(engine.AUTOEP_PRESETS)}); set parallel.ep_size=1")
    assert {"qwen3_moe", "mixtral"} <= set(engine.AUTOEP_PRESETS)


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.r=8"], "model.lora.r=8 with parallel.ep_size=2: DeepSpeed's AutoEP replaces the MoE blocks (and the "
     "experts peft would adapt) inside deepspeed.initialize, after the adapters are attached; set parallel.ep_size=1 "
     "or model.lora.r=0"),
])
def test_what_expert_parallelism_does_not_combine_with_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        _cfg(*overrides)
    assert str(info.value) == message


def test_the_export_reads_expert_parallel_checkpoints():
    """train.export_hf combines with expert parallelism: the export gathers the experts through the
    checkpoint's universal form (tests/checkpoint/test_ep_checkpoint.py)."""
    assert _cfg("train.export_hf=true").train.export_hf


def test_grouped_gemm_alignment():
    """torch's CPU grouped GEMM needs 16-byte rows: hidden 64 and experts' 64 in bf16 (128 bytes) pass,
    hidden 4 in bf16 (8 bytes) does not, and in fp32 hidden 4 (16 bytes) does."""
    from megakto.runners.expert import grouped_mm_aligned

    assert grouped_mm_aligned(_tiny_config(), 2)
    assert not grouped_mm_aligned(_tiny_config(hidden_size=4), 2)
    assert grouped_mm_aligned(_tiny_config(hidden_size=4, moe_intermediate_size=4), 4)


def test_registry_shim_is_needed_applied_and_harmless():
    """transformers 5.25's router-output registry takes a model where DeepSpeed's AutoEP passes a
    string key with a default; the shim lets string keys through as a plain dict would and leaves the
    model-keyed calls as they were. A plain dict registry (other transformers releases) is left alone."""
    from transformers.utils import output_capturing

    from megakto.distributed.engine import allow_string_registry_keys
    from megakto.distributed._deepspeed.expert import registry_needs_shim

    installed = type(output_capturing._CAN_RECORD_REGISTRY)
    assert registry_needs_shim(installed)  # transformers 5.25 needs it (no engine was built in this process)

    class Registry(installed):  # the shim applied to a subclass, so the test leaves transformers' class alone
        pass

    class Model:
        pass

    registry = Registry()
    with pytest.raises(TypeError):
        registry.get("key", None)  # what DeepSpeed 0.19.8 calls
    assert allow_string_registry_keys(Registry) and not allow_string_registry_keys(Registry)  # applied once
    registry["<class 'x'>"] = {"router_logits": 1}
    assert registry.get("<class 'x'>", None) == {"router_logits": 1} and registry.get("missing", 0) == 0
    registry[Model()] = {"a": 2}
    assert registry.get(Model()) == {"a": 2} and str(Model) in registry
    assert not allow_string_registry_keys(dict)  # a plain dict: nothing to do

    class Plain(dict):
        def get(self, key, default=None):
            return super().get(key, default)

    assert not allow_string_registry_keys(Plain) and not getattr(Plain, "_megakto_str_keys", False)
