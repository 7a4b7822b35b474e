"""Can this model be split ``tp`` ways? Checked from its config.json before any weight is loaded.

AutoTP follows the model's Hugging Face tensor-parallel plan (``base_model_tp_plan``): attention
splits by heads, the MLP by its width, the output head by vocabulary rows (megakto's log-probs
reduce over those rows). Each of those sizes must divide evenly, or ranks would hold different
amounts of a layer (DeepSpeed pads or fails deep inside the first forward). A model without a plan
would go through DeepSpeed's heuristic parser, which may leave layers whole without saying so.

After the engine is built, :func:`check_vocab_parallel_head` asserts what the head became.
"""

from __future__ import annotations

from megakto.errors import ModelError

__all__ = ["AUTOTP_PLAN_STYLES", "check_tp_config", "check_vocab_parallel_head"]

# The tp_plan styles DeepSpeed's AutoTP converts (deepspeed.module_inject.tp_plan_converter's
# SUPPORTED_STYLES in 0.19.8; a unit test compares them). A plan with any other style is rejected
# whole inside deepspeed.initialize, after the weights loaded: Phi-3's fused projections and
# OLMo-2's full-width q/k norms use rowwise_split_input.
AUTOTP_PLAN_STYLES = frozenset({"colwise", "colwise_rep", "colwise_gather_output", "rowwise",
                                "replicated_with_grad_allreduce", "embedding_rowwise"})

# (config attribute, what it is) for the sizes AutoTP divides.
_DIVIDED = (
    ("num_attention_heads", "attention heads"),
    ("num_key_value_heads", "key-value heads"),
    ("intermediate_size", "MLP width"),
    ("vocab_size", "vocabulary"),
)


def check_tp_config(config, tp: int, *, key: str = "model.path") -> None:
    """ModelError naming ``key`` (the config key of the model folder) unless ``config`` (a
    transformers ``PretrainedConfig``) splits ``tp`` ways."""
    if tp == 1:
        return
    config = getattr(config, "get_text_config", lambda: config)()
    where = f"{key}: parallel.tp_size={tp}"
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        raise ModelError(f"{where}: {type(config).__name__} ({config.model_type}) has no tensor-parallel plan "
                         "(base_model_tp_plan), so AutoTP cannot be trusted to split it; use parallel.tp_size=1 "
                         "(ZeRO-3 splits it instead)")
    odd = sorted((str(style), layer) for layer, style in plan.items() if str(style).lower() not in AUTOTP_PLAN_STYLES)
    if odd:
        styles = ", ".join(sorted({style for style, _ in odd}))
        raise ModelError(f"{where}: {type(config).__name__} ({config.model_type})'s tensor-parallel plan splits "
                         f"{odd[0][1]} as {styles}, which DeepSpeed's AutoTP does not implement; use "
                         "parallel.tp_size=1 (ZeRO-3 splits it instead)")
    for attr, what in _DIVIDED:
        value = getattr(config, attr, None)
        if attr == "num_key_value_heads" and value is None:
            value = getattr(config, "num_attention_heads", None)
        if value is None:
            raise ModelError(f"{where}: config.json has no {attr}, which tensor parallelism divides")
        if value % tp:
            hint = (f"pad the vocabulary to a multiple of {tp} (model.resize_token_embeddings(n, pad_to_multiple_of={tp}) "
                    "and save the model)" if attr == "vocab_size" else f"choose a parallel.tp_size dividing {value}")
            raise ModelError(f"{where} does not divide the {what}: {attr}={value}; {hint}")


def check_vocab_parallel_head(model, tp: int) -> None:
    """After the engine: the output head of ``model`` (an engine or an HF model) holds this rank's
    ``vocab_size / tp`` rows and says which (DeepSpeed's ``VocabParallelLinear``); anything else
    means log-probs would be wrong. Nothing is asked of the head when ``tp == 1`` (``model.logps=full``
    models may have heads the chunked path cannot use)."""
    if tp == 1:
        return
    from megakto.model.lm_head import output_head

    vocab_size = getattr(model, "module", model).config.vocab_size
    head = output_head(model)
    start, end = getattr(head, "vocab_start_index", None), getattr(head, "vocab_end_index", None)
    weight = head.weight
    rows = tuple(getattr(weight, "ds_shape", weight.shape))[0]
    if start is None or end is None or end - start != vocab_size // tp or rows != vocab_size // tp:
        raise ModelError(f"parallel.tp_size={tp}: the output head is a {type(head).__name__} with {rows} rows, not a "
                         f"vocabulary-parallel head of {vocab_size // tp} rows per rank; this deepspeed did not split "
                         "it (needs tensor_parallel.vocab_parallel_lm_head)")
