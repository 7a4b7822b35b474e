"""megakto.config: YAML + dotted overrides -> typed values, and one-line errors naming the key."""

import dataclasses
import textwrap

import pytest
import yaml

from megakto.config import (
    Config,
    config_help,
    config_to_dict,
    load_config,
    save_config,
    validate,
)
from megakto.errors import ConfigError

REQUIRED = ["model.path=models/tiny", "data.train_files=train.jsonl"]


def _yaml(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _error(yaml_path, overrides):
    with pytest.raises(ConfigError) as info:
        load_config(yaml_path, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k


# --- values ---------------------------------------------------------------------------------


def test_yaml_then_overrides_give_exact_typed_values(tmp_path):
    path = _yaml(tmp_path, """\
        output_dir: runs/a
        seed: 3
        model:
          path: models/tiny
          dtype: bfloat16
        data:
          train_files: [d/train1.jsonl, d/train2.jsonl]
          max_length: 300
        kto:
          beta: 0.25
        optim:
          lr: 1e-5          # PyYAML reads this as the string "1e-5"
          betas: [0.8, 0.95]
        train:
          max_steps: 50
        """)
    cfg = load_config(path, [
        "train.max_steps=7",
        "model.gradient_checkpointing=yes",
        "data.eval_files=[e1.jsonl, e2.jsonl]",
        "optim.weight_decay=0.01",
        "optim.warmup_steps=2",
        "ref.offload=none",
        "dist.timeout_minutes=3",
        "train.resume=auto",
    ])
    assert cfg.output_dir == "runs/a" and cfg.seed == 3
    assert cfg.model.path == "models/tiny" and cfg.model.dtype == "bfloat16"
    assert cfg.model.gradient_checkpointing is True
    assert cfg.data.train_files == ["d/train1.jsonl", "d/train2.jsonl"]
    assert cfg.data.eval_files == ["e1.jsonl", "e2.jsonl"]
    assert cfg.kto.beta == 0.25
    assert cfg.optim.lr == 1e-5 and type(cfg.optim.lr) is float
    assert cfg.optim.betas == [0.8, 0.95]
    assert cfg.optim.weight_decay == 0.01
    assert cfg.train.max_steps == 7 and type(cfg.train.max_steps) is int
    assert cfg.optim.warmup_steps == 2
    assert cfg.ref.offload == "none"
    # An int written for a float key becomes a float.
    assert cfg.dist.timeout_minutes == 3.0 and type(cfg.dist.timeout_minutes) is float
    assert cfg.train.resume == "auto"
    # Untouched keys keep their defaults.
    assert cfg.train.global_batch_size == 16 and cfg.kto.loss_type == "kto"
    # Derived defaults: max_prompt_length = 300 // 2 = 150; tokenizer and reference = model.path.
    assert cfg.data.max_prompt_length == 150
    assert cfg.model.tokenizer_path == "models/tiny"
    assert cfg.ref.path == "models/tiny"


def test_overrides_apply_in_order_after_yaml(tmp_path):
    path = _yaml(tmp_path, "train: {max_steps: 50}\n")
    cfg = load_config(path, REQUIRED + ["train.max_steps=9", "train.max_steps=11"])
    assert cfg.train.max_steps == 11


def test_no_yaml_file_and_empty_yaml_file(tmp_path):
    assert load_config(None, REQUIRED).train.max_steps == 100
    empty = _yaml(tmp_path, "")
    assert load_config(empty, REQUIRED).model.path == "models/tiny"
    # A section left empty in YAML (`kto:` with nothing under it) keeps its defaults.
    blank_section = _yaml(tmp_path, "kto:\n", "blank.yaml")
    assert load_config(blank_section, REQUIRED).kto.beta == 0.1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("true", True), ("True", True), ("1", True), ("yes", True),
        ("false", False), ("0", False), ("no", False), ("NO", False),
    ],
)
def test_bool_override_spellings(text, expected):
    cfg = load_config(None, REQUIRED + [f"model.disable_dropout={text}"])
    assert cfg.model.disable_dropout is expected


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.train_files=a.jsonl,b.jsonl", ["a.jsonl", "b.jsonl"]),
        ("data.train_files= a.jsonl , b.jsonl ,", ["a.jsonl", "b.jsonl"]),
        ("data.train_files=[a.jsonl, b.jsonl]", ["a.jsonl", "b.jsonl"]),
        ("data.train_files=only.jsonl", ["only.jsonl"]),
    ],
)
def test_list_of_str_overrides(override, expected):
    cfg = load_config(None, ["model.path=m", override])
    assert cfg.data.train_files == expected


def test_list_of_float_and_empty_list_overrides():
    cfg = load_config(None, REQUIRED + ["optim.betas=0.5,0.9", "data.eval_files="])
    assert cfg.optim.betas == [0.5, 0.9] and all(type(b) is float for b in cfg.optim.betas)
    assert cfg.data.eval_files == []
    cfg = load_config(None, REQUIRED + ["optim.betas=[0.7, 0.99]", "data.eval_files=[]"])
    assert cfg.optim.betas == [0.7, 0.99] and cfg.data.eval_files == []


def test_yaml_scalar_string_for_a_list_key(tmp_path):
    path = _yaml(tmp_path, "model: {path: m}\ndata: {train_files: d/train.jsonl}\n")
    assert load_config(path, []).data.train_files == ["d/train.jsonl"]


def test_desirable_weight_auto_or_float(tmp_path):
    assert load_config(None, REQUIRED + ["kto.desirable_weight=auto"]).kto.desirable_weight == "auto"
    cfg = load_config(None, REQUIRED + ["kto.desirable_weight=1.33"])
    assert cfg.kto.desirable_weight == 1.33 and type(cfg.kto.desirable_weight) is float
    path = _yaml(tmp_path, "kto: {desirable_weight: auto, undesirable_weight: 2}\n")
    cfg = load_config(path, REQUIRED)
    assert cfg.kto.desirable_weight == "auto" and cfg.kto.undesirable_weight == 2.0
    path = _yaml(tmp_path, "kto: {desirable_weight: 3}\n", "int.yaml")
    assert load_config(path, REQUIRED).kto.desirable_weight == 3.0


def test_optional_keys_accept_null():
    cfg = load_config(None, REQUIRED + ["data.num_proc=4", "data.max_prompt_length=100"])
    assert cfg.data.num_proc == 4 and cfg.data.max_prompt_length == 100
    cfg = load_config(None, REQUIRED + ["data.num_proc=null", "data.max_prompt_length=None"])
    # max_length 512 -> max_prompt_length 512 // 2 = 256.
    assert cfg.data.num_proc is None and cfg.data.max_prompt_length == 256
    cfg = load_config(None, REQUIRED + ["model.tokenizer_path=tok", "ref.path=ref"])
    assert cfg.model.tokenizer_path == "tok" and cfg.ref.path == "ref"


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, REQUIRED + ["kto.desirable_weight=auto", "optim.betas=0.5,0.9",
                                        "data.num_proc=null", "train.max_steps=3"])
    out = tmp_path / "sub" / "config.yaml"
    save_config(cfg, str(out))
    plain = yaml.safe_load(out.read_text())
    assert plain["kto"]["desirable_weight"] == "auto" and plain["train"]["max_steps"] == 3
    assert load_config(str(out), []) == cfg
    assert config_to_dict(cfg) == plain


def test_config_help_lists_every_key_with_type_and_default():
    text = config_help()
    lines = text.splitlines()
    keys = list(_leaves(config_to_dict(Config())))
    assert len(lines) == len(keys) == 76  # 2 top-level + the sections' keys (parallel: tp, pp, pp_partition, sp, ep; data.overlong)
    for line, key in zip(lines, keys):
        assert line.startswith(key + ": ")
    assert "train.max_steps: int = 100 " in text
    assert "kto.desirable_weight: float or 'auto' = 1.0 " in text
    assert "kto.loss_type: one of 'kto', 'apo_zero_unpaired', 'sft' = \"kto\" " in text
    assert "model.tokenizer_path: str or null = null " in text
    assert "optim.betas: list of float = [0.9, 0.999] " in text
    # Every field has non-empty help after its default.
    for f in dataclasses.fields(Config):
        assert f.metadata["help"]


# --- errors ---------------------------------------------------------------------------------


def test_unknown_key_lists_valid_keys_and_closest_match():
    msg = _error(None, REQUIRED + ["train.max_step=5"])
    assert msg == (
        "unknown config key 'train.max_step'; valid keys in 'train': eval_batch_size, eval_every, "
        "eval_samples, export_hf, global_batch_size, health_checks, log_every, max_skipped_steps, max_steps, "
        "micro_batch_size, resume, sample_max_new_tokens; did you mean 'train.max_steps'?"
    )


def test_unknown_key_in_yaml_and_in_wrong_section(tmp_path):
    path = _yaml(tmp_path, "kto:\n  betta: 0.2\n")
    msg = _error(path, REQUIRED)
    assert msg.startswith("unknown config key 'kto.betta'; valid keys in 'kto': allow_single_class, ")
    assert msg.endswith("did you mean 'kto.beta'?")
    # The right name in the wrong section points at the section that has it.
    assert _error(None, REQUIRED + ["train.lr=1e-5"]).endswith("did you mean 'optim.lr'?")


def test_unknown_section():
    msg = _error(None, REQUIRED + ["trian.max_steps=5"])
    assert msg == (
        "unknown config key 'trian.max_steps'; valid top-level keys: checkpoint, data, dist, health, kto, "
        "model, optim, output_dir, parallel, ref, seed, train; did you mean 'train'?"
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_steps=ten", "config key 'train.max_steps' expects int, got 'ten' (command-line override)"),
        ("train.max_steps=2.5", "config key 'train.max_steps' expects int, got '2.5' (command-line override)"),
        ("kto.beta=high", "config key 'kto.beta' expects float, got 'high' (command-line override)"),
        ("model.disable_dropout=maybe",
         "config key 'model.disable_dropout' expects bool (true/false/1/0/yes/no), got 'maybe' "
         "(command-line override)"),
        ("data.num_proc=many", "config key 'data.num_proc' expects int or null, got 'many' (command-line override)"),
        ("optim.betas=0.9,abc", "config key 'optim.betas' expects list of float, got '0.9,abc' (command-line override)"),
        ("kto.desirable_weight=heavy",
         "config key 'kto.desirable_weight' expects float or 'auto', got 'heavy' (command-line override)"),
        ("model.vocab_block_rows=big",
         "config key 'model.vocab_block_rows' expects int or 'auto', got 'big' (command-line override)"),
    ],
)
def test_wrong_type_names_key_type_and_value(override, expected):
    assert _error(None, REQUIRED + [override]) == expected


def test_vocab_block_rows_auto_int_or_off():
    assert load_config(None, REQUIRED).model.vocab_block_rows == "auto"
    assert load_config(None, REQUIRED + ["model.vocab_block_rows=4096"]).model.vocab_block_rows == 4096
    assert load_config(None, REQUIRED + ["model.vocab_block_rows=0"]).model.vocab_block_rows == 0
    assert "model.vocab_block_rows must be auto or >= 0" in _error(None, REQUIRED + ["model.vocab_block_rows=-2"])


def test_literal_names_allowed_values_and_closest():
    assert _error(None, REQUIRED + ["kto.loss_type=dpo"]) == (
        "config key 'kto.loss_type' expects one of 'kto', 'apo_zero_unpaired', 'sft', got 'dpo' "
        "(command-line override)"
    )
    assert _error(None, REQUIRED + ["optim.schedule=cosin"]).endswith(
        "expects one of 'cosine', 'linear', 'constant', got 'cosin' (command-line override); "
        "did you mean 'cosine'?"
    )
    assert _error(None, REQUIRED + ["kto.desirable_weight=Auto"]).endswith("did you mean 'auto'?")


def test_wrong_type_from_yaml_names_file(tmp_path):
    path = _yaml(tmp_path, "kto:\n  beta: [1]\ntrain:\n  max_steps: 1.0\n")
    assert _error(path, REQUIRED) == f"config key 'kto.beta' expects float, got [1] (in {path})"
    path = _yaml(tmp_path, "model: {path: m, trust_remote_code: 2}\n", "b.yaml")
    assert _error(path, []) == (
        f"config key 'model.trust_remote_code' expects bool (true/false/1/0/yes/no), got 2 (in {path})"
    )


def test_override_without_equals():
    assert _error(None, ["train.max_steps"]) == (
        "override 'train.max_steps' has no '='; write dotted key=value, e.g. train.max_steps=10"
    )


def test_section_and_leaf_misuse(tmp_path):
    assert _error(None, ["train=5"]) == (
        "config key 'train' is a section; override one of its keys, e.g. train.max_steps=..."
    )
    assert _error(None, ["seed.value=1"]) == "config key 'seed' is not a section; cannot set 'seed.value'"
    path = _yaml(tmp_path, "train: 5\n")
    assert _error(path, []) == (
        f"config key 'train' is a section and needs a mapping of its keys, got 5 (in {path})"
    )


def test_yaml_file_errors(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert _error(missing, []) == f"config file not found: {missing}"
    a_list = _yaml(tmp_path, "- a\n- b\n", "list.yaml")
    assert _error(a_list, []) == (
        f"config file {a_list} must hold a mapping of sections (model:, data:, ...), got list"
    )
    broken = _yaml(tmp_path, "model:\n  path: [unclosed\n", "broken.yaml")
    msg = _error(broken, [])
    assert msg.startswith(f"config file {broken} is not valid YAML at line ")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.train_files=t.jsonl"], "model.path is required"),
        (["model.path=m"], "data.train_files is required"),
        (REQUIRED + ["train.max_steps=0"], "train.max_steps must be > 0, got 0"),
        (REQUIRED + ["train.micro_batch_size=-1"], "train.micro_batch_size must be > 0, got -1"),
        (REQUIRED + ["kto.beta=0"], "kto.beta must be > 0, got 0.0"),
        (REQUIRED + ["kto.desirable_weight=-1"], "kto.desirable_weight must be > 0, got -1.0"),
        (REQUIRED + ["optim.lr=0"], "optim.lr must be > 0, got 0.0"),
        (REQUIRED + ["optim.grad_clip=-1"], "optim.grad_clip must be >= 0, got -1.0"),
        (REQUIRED + ["train.eval_every=-2"], "train.eval_every must be >= 0, got -2"),
        (REQUIRED + ["train.max_skipped_steps=-1"], "train.max_skipped_steps must be >= 0, got -1"),
        (REQUIRED + ["checkpoint.keep_last=0"], "checkpoint.keep_last must be > 0, got 0"),
        (REQUIRED + ["kto.router_aux_coef=-0.01"], "kto.router_aux_coef must be >= 0, got -0.01"),
        (REQUIRED + ["health.router_collapse=0"], "health.router_collapse must be in (0, 1], got 0.0"),
        (REQUIRED + ["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio must be in [0, 1], got 1.5"),
        (REQUIRED + ["optim.betas=0.9"], "optim.betas must be two numbers in [0, 1), got [0.9]"),
        (REQUIRED + ["data.max_length=256", "data.max_prompt_length=256"],
         "data.max_prompt_length=256 must be < data.max_length=256 to leave room for the completion"),
        (REQUIRED + ["train.global_batch_size=10"],
         "train.global_batch_size=10 is not divisible by train.micro_batch_size=4"),
        (REQUIRED + ["train.global_batch_size=1", "train.micro_batch_size=1"],
         "kto.loss_type='kto' needs train.global_batch_size >= 2"),
        (REQUIRED + ["train.global_batch_size=1", "train.micro_batch_size=1", "kto.kl_scope=microbatch"],
         "kto.loss_type='kto' needs train.global_batch_size >= 2"),
    ],
)
def test_validation_errors(overrides, expected):
    assert _error(None, overrides).startswith(expected)


def test_single_row_batches_are_fine_without_kl():
    cfg = load_config(None, REQUIRED + ["train.global_batch_size=1", "train.micro_batch_size=1",
                                        "kto.loss_type=apo_zero_unpaired"])
    assert cfg.train.global_batch_size == 1


def test_validate_accepts_a_hand_built_config():
    cfg = Config()
    cfg.model.path = "m"
    cfg.data.train_files = ["t.jsonl"]
    validate(cfg)
    cfg.optim.min_lr_ratio = -0.1
    with pytest.raises(ConfigError, match=r"optim.min_lr_ratio must be in \[0, 1\], got -0.1"):
        validate(cfg)


def test_micro_batch_of_one_is_valid_for_kto():
    """KL partners come from the whole global batch, so a micro-batch of 1 still has partners
    (TRL's per-device rotation pairs such a row with itself)."""
    cfg = load_config(None, REQUIRED + ["train.micro_batch_size=1", "kto.kl_scope=microbatch"])
    assert cfg.train.micro_batch_size == 1 and cfg.kto.kl_scope == "microbatch"


@pytest.mark.parametrize("overrides, expected", [
    (["parallel.tp_size=0"], "parallel.tp_size must be > 0, got 0"),
    (["parallel.tp_size=2", "parallel.pp_size=2"],
     "parallel.tp_size=2 with parallel.pp_size=2: DeepSpeed has no AutoTP inside a pipeline; use one of them"),
    (["parallel.pp_size=0"], "parallel.pp_size must be > 0, got 0"),
    (["parallel.pp_size=2", "model.logps=full"],
     "model.logps=full with parallel.pp_size=2: the last stage scores log-probs with the chunked head; set "
     "model.logps=chunked (or auto)"),
    (["parallel.pp_size=2", "model.vocab_block_rows=128"],
     "model.vocab_block_rows=128 with parallel.pp_size=2: the embedding and the output head are pipeline stages "
     "of their own; set model.vocab_block_rows=0 (or auto, which is off under pipelines)"),
    (["parallel.pp_partition=layers"], "parallel.pp_partition='layers': expected parameters, uniform or type:<regex>"),
    (["parallel.pp_partition=type:"], "parallel.pp_partition='type:': expected parameters, uniform or type:<regex>"),
    (["parallel.tp_size=2", "model.logps=full"],
     "model.logps=full with parallel.tp_size=2: each rank holds 1/tp of the output head, so only the chunked "
     "vocabulary-parallel log-probs are exact; set model.logps=chunked (or auto)"),
    (["parallel.tp_size=2", "model.vocab_block_rows=128"],
     "model.vocab_block_rows=128 with parallel.tp_size=2: AutoTP splits the output head itself and needs it "
     "whole; set model.vocab_block_rows=0 (or auto, which is off under tensor parallelism)"),
])
def test_parallel_section_errors(overrides, expected):
    assert _error(None, REQUIRED + overrides) == expected


def test_parallel_defaults_and_tp():
    assert (load_config(None, REQUIRED).parallel.tp_size, load_config(None, REQUIRED).parallel.pp_size) == (1, 1)
    assert load_config(None, REQUIRED).parallel.pp_partition == "parameters"
    for partition in ("uniform", "type:DecoderStage"):
        assert load_config(None, REQUIRED + [f"parallel.pp_partition={partition}"]).parallel.pp_partition == partition
    cfg = load_config(None, REQUIRED + ["parallel.tp_size=4"])
    assert cfg.parallel.tp_size == 4 and cfg.model.vocab_block_rows == "auto"
