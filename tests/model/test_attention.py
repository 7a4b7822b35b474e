"""model.attn_implementation: ``auto`` resolves per model family before any weights load, an
unsupported choice is one line listing the ones that work, and packed rows give the unpacked
log-probs in the implementation picked (Llama, Qwen2, Mistral, Gemma2; tiny random models)."""


import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

from megakto.config import ModelConfig
from megakto.data.collate import collate
from megakto.data.packing import pack
from megakto.errors import ConfigError
from megakto.model.forward import completion_logps, packed_completion_logps
from megakto.model.load import check_model_settings
from tests.model.test_packed_forward import VOCAB, _rows

PAD = 0
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD)
# Sliding windows of 8 tokens, shorter than most rows below, so the sliding-window masks matter.
FAMILIES = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=8),
    # Gemma2: logit soft-capping, sqrt(hidden)-scaled embeddings, attention soft-capping, no sdpa.
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=16, sliding_window=8),
}


def _folder(tmp_path, family):
    """A model folder with only config.json: the settings check reads no weights."""
    path = tmp_path / family
    FAMILIES[family]().save_pretrained(path)
    return str(path)


def _check(path, attn, logps="full", ref_path=None):
    return check_model_settings(path, attn_implementation=attn, logps=logps, trust_remote_code=False,
                                ref_path=ref_path)


def _error(*args, **kwargs):
    with pytest.raises(ConfigError) as info:
        _check(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_default_is_auto():
    assert ModelConfig().attn_implementation == "auto"


@pytest.mark.parametrize("family, picked", [("llama", "sdpa"), ("qwen2", "sdpa"), ("mistral", "sdpa"),
                                            ("gemma2", "eager")])
def test_auto_is_what_transformers_picks(tmp_path, family, picked):
    assert _check(_folder(tmp_path, family), "auto") == picked


def test_explicit_supported_choice_is_kept(tmp_path):
    assert _check(_folder(tmp_path, "llama"), "eager") == "eager"
    assert _check(_folder(tmp_path, "gemma2"), "eager") == "eager"


def test_unsupported_choice_names_key_class_and_working_choices(tmp_path):
    path = _folder(tmp_path, "gemma2")
    msg = _error(path, "sdpa")
    assert msg.startswith(f"model.attn_implementation=sdpa cannot run Gemma2ForCausalLM (model.path={path}): "
                          "Gemma2ForCausalLM does not support an attention implementation through "
                          "torch.nn.functional.scaled_dot_product_attention yet; choices that work here: auto, eager")
    choices = msg.rsplit(": ", 1)[-1].split(", ")
    assert "sdpa" not in choices and choices[:2] == ["auto", "eager"]


def test_unknown_choice_lists_working_choices(tmp_path):
    msg = _error(_folder(tmp_path, "llama"), "fast")
    assert msg.startswith("model.attn_implementation=fast cannot run LlamaForCausalLM (model.path=")
    assert "choices that work here: auto, eager, sdpa" in msg


def test_uninstalled_flash_attention_is_one_line(tmp_path):
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed")
    except ImportError:
        pass
    msg = _error(_folder(tmp_path, "qwen2"), "flash_attention_2")
    assert msg.startswith("model.attn_implementation=flash_attention_2 cannot run Qwen2ForCausalLM")
    assert "choices that work here: auto, eager, sdpa" in msg and "flash_attention_2," not in msg


def test_policy_and_reference_of_different_families(tmp_path):
    llama, gemma2 = _folder(tmp_path, "llama"), _folder(tmp_path, "gemma2")
    assert _check(llama, "auto", ref_path=gemma2) == "eager"  # the one both run
    assert _check(llama, "auto", ref_path=llama) == "sdpa"
    assert f"(ref.path={gemma2})" in _error(llama, "sdpa", ref_path=gemma2)


def test_chunked_logps_refused_for_soft_capped_logits(tmp_path):
    """Gemma2 soft-caps its logits after the head; chunked log-probs would skip that."""
    path = _folder(tmp_path, "gemma2")
    assert _error(path, "auto", logps="chunked") == (
        f"model.logps=chunked cannot be used with Gemma2ForCausalLM (model.path={path}): it changes the "
        "logits after the output head (final_logit_softcapping=30.0), which chunked log-probs skip; "
        "set model.logps=full (or auto)"
    )
    assert _check(_folder(tmp_path, "llama"), "auto", logps="chunked") == "sdpa"


def _model(family, attn):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation=attn).float().eval()
    assert model.config._attn_implementation == attn
    return model


@pytest.mark.parametrize("family, attn", [
    ("qwen2", "eager"), ("qwen2", "sdpa"), ("mistral", "eager"), ("mistral", "sdpa"),
    ("llama", "auto"), ("qwen2", "auto"), ("mistral", "auto"), ("gemma2", "auto"),
])
def test_packed_equals_unpacked(tmp_path, family, attn):
    """12 rows packed into rows of 64 tokens give the right-padded batch's log-probs (to 2e-5) and
    gradients (to 1e-5), with the log-prob mode the settings check allows (chunked, or full for
    Gemma2), in the implementation the check resolves."""
    logps_mode = "full" if family == "gemma2" else "chunked"
    resolved = _check(_folder(tmp_path, family), attn, logps=logps_mode)
    model = _model(family, resolved)
    rows = _rows(seed=1)
    ref, ref_n = completion_logps(model, collate(rows, pad_id=PAD))
    model.zero_grad()
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = pack(rows, max_tokens_per_row=64, pad_id=PAD)
    assert packed.input_ids.shape[0] < len(rows) and (packed.segment_ids < 0).any()
    logps, n = packed_completion_logps(model, packed, attn=resolved, mode=logps_mode)
    assert n.tolist() == ref_n.tolist()
    torch.testing.assert_close(logps, ref, rtol=0, atol=2e-5)
    model.zero_grad()
    logps.sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=0, atol=1e-5, msg=f"grad of {name}")
