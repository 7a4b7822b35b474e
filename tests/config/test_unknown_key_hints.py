"""Unknown config keys point at megakto's key across all sections, and at the equivalent of a
name from TRL's KTOConfig / Hugging Face TrainingArguments, whichever section it was written in."""

import textwrap

import pytest

from tests.config.test_config import _error

REQUIRED = ["model.path=models/tiny", "data.train_files=train.jsonl"]


def _hint(msg):
    """The part after the list of valid keys."""
    return msg.rsplit("; ", 1)[-1]


@pytest.mark.parametrize(
    "key, hint",
    [
        # Another trainer's name, in a section or bare.
        ("train.learning_rate", "did you mean 'optim.lr'?"),
        ("learning_rate", "did you mean 'optim.lr'?"),
        ("optim.learning_rate", "did you mean 'optim.lr'?"),
        ("train.per_device_train_batch_size", "did you mean 'train.micro_batch_size'?"),
        ("per_device_eval_batch_size", "did you mean 'train.eval_batch_size'?"),
        ("train.max_prompt_length", "did you mean 'data.max_prompt_length'?"),
        ("max_length", "did you mean 'data.max_length'?"),
        ("beta", "did you mean 'kto.beta'?"),
        ("train.desirable_weight", "did you mean 'kto.desirable_weight'?"),
        ("train.warmup_steps", "did you mean 'optim.warmup_steps'?"),
        ("weight_decay", "did you mean 'optim.weight_decay'?"),
        ("train.max_grad_norm", "did you mean 'optim.grad_clip'?"),
        ("train.output_dir", "did you mean 'output_dir'?"),
        ("train.logging_steps", "did you mean 'train.log_every'?"),
        ("save_steps", "did you mean 'checkpoint.every_steps'?"),
        ("training_args.learning_rate", "did you mean 'optim.lr'?"),
        # A near spelling of a name in another section.
        ("train.learning_rat", "did you mean 'optim.lr'?"),
        ("train.max_prompt_len", "did you mean 'data.max_prompt_length'?"),
        # Names with no one-to-one equivalent say what to set instead.
        ("train.num_train_epochs",
         "megakto counts optimizer steps, not epochs: set train.max_steps "
         "(rows per step = train.global_batch_size)"),
        ("gradient_accumulation_steps",
         "gradient accumulation follows from the batch sizes: set train.global_batch_size "
         "(= train.micro_batch_size x accumulation steps x data-parallel ranks)"),
        ("optim.warmup_ratio", "set optim.warmup_steps (a number of steps, not a fraction of train.max_steps)"),
    ],
)
def test_override_hint(key, hint):
    msg = _error(None, REQUIRED + [f"{key}=1"])
    assert msg.startswith(f"unknown config key '{key}'; valid ")
    assert _hint(msg) == hint


def test_hint_from_yaml(tmp_path):
    path = tmp_path / "trl_style.yaml"
    path.write_text(textwrap.dedent("""\
        model: {path: models/tiny}
        data: {train_files: [train.jsonl]}
        train:
          learning_rate: 1.0e-5
    """))
    msg = _error(str(path), [])
    assert msg.startswith("unknown config key 'train.learning_rate'; valid keys in 'train': ")
    assert msg.endswith("; did you mean 'optim.lr'?")
    path.write_text("model: {path: models/tiny}\nnum_train_epochs: 3\n")
    assert _error(str(path), []).endswith("; megakto counts optimizer steps, not epochs: set train.max_steps "
                                          "(rows per step = train.global_batch_size)")


def test_nothing_close_gives_no_hint():
    msg = _error(None, REQUIRED + ["train.zzzz=1"])
    assert "did you mean" not in msg and msg.startswith("unknown config key 'train.zzzz'; valid keys in 'train': ")
