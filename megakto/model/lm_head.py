"""Completion log-probs of a Hugging Face causal LM without its full (B, T, V) logits.

The model's own forward is kept (attention masks, position ids, every architecture detail); only
the output embedding's forward is swapped, for one call, with a function that turns the final
hidden states straight into summed completion log-probs
(:func:`megakto.kto.chunked_logps.chunked_sequence_logps`). That function runs *inside* the
module's ``__call__``, which is what makes it work under DeepSpeed ZeRO-3:

* the engine's pre-forward hook has gathered the partitioned ``lm_head.weight`` (or the tied input
  embedding) by the time ``self.weight`` is read, and the post-forward hook releases it;
* the engine hooks the module's *output* tensor so that backward re-gathers the weight before
  gradients reach it. The log-probs are therefore returned as the module's output, shaped
  (B, 1, 1) so that the model passes them on as ``logits``, and read back from the model output
  (not from a side channel, which would bypass that hook).

Models that transform logits after the head (Gemma's soft-capping, Cohere's logit scale) or that
do not call the head module are detected and refused: the value the model returns must be exactly
the value the head produced.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from megakto.data.collate import Batch
from megakto.errors import ModelError
from megakto.kto.chunked_logps import chunked_sequence_logps

__all__ = ["completion_logps_chunked", "chunked_output_head", "replaced_output_head", "check_head_output", "output_head"]


def output_head(model) -> torch.nn.Module:
    """The output-embedding module of an HF model, or of the model inside a DeepSpeed engine."""
    inner = model if hasattr(model, "get_output_embeddings") else getattr(model, "module", None)
    has_head = inner is not None and hasattr(inner, "get_output_embeddings")
    head = inner.get_output_embeddings() if has_head else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ModelError(
            f"{type(model).__name__} has no output embedding with a .weight; chunked log-probs need one; "
            "use megakto.model.forward.completion_logps (full logits) instead"
        )
    if getattr(head, "bias", None) is not None:
        raise ModelError(
            f"output embedding {type(head).__name__} has a bias; chunked log-probs support bias-free heads only"
        )
    return head


@contextlib.contextmanager
def replaced_output_head(head: torch.nn.Module, fn) -> Iterator[dict]:
    """While active, ``head(hidden)`` returns ``fn(hidden, head.weight)``; the yielded dict records
    the call count and a detached copy of the last result."""
    state = {"calls": 0, "logps": None}

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        # head.weight is read here, inside the module call: under ZeRO-3 it is materialised now.
        result = fn(hidden_states, head.weight)
        state["calls"] += 1
        state["logps"] = result.detach()
        return result

    had_own = "forward" in head.__dict__  # e.g. a forward already patched by another library
    saved = head.__dict__.get("forward")
    head.forward = forward
    try:
        yield state
    finally:
        if had_own:
            head.forward = saved
        else:
            del head.forward


def check_head_output(model, logits: torch.Tensor, state: dict, n: int) -> torch.Tensor:
    """The (n,) values the model returned, after checking they are exactly what the head produced."""
    if (
        state["calls"] != 1
        or tuple(logits.shape) != (n, 1, 1)
        or not torch.equal(logits.detach().reshape(n).to(state["logps"].dtype), state["logps"].reshape(n))
    ):
        raise ModelError(
            f"{type(getattr(model, 'module', model)).__name__} does not return its output head's result "
            f"unchanged (head called {state['calls']} times); chunked log-probs cannot be used with it; "
            "set model.logps=full"
        )
    # The model's output, not state["logps"]: under ZeRO-3 only this tensor carries the engine's
    # backward hook that re-gathers the head weight.
    return logits.reshape(n)


@contextlib.contextmanager
def chunked_output_head(
    head: torch.nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor, *, chunk_size: int = 1024
) -> Iterator[dict]:
    """While active, ``head(hidden)`` returns the (B, 1, 1) summed completion log-probs of
    ``input_ids`` instead of logits; the yielded dict records the call count and the last result."""

    def fn(hidden_states, weight):
        logps, _ = chunked_sequence_logps(hidden_states, weight, input_ids, completion_mask, chunk_size=chunk_size)
        return logps.view(-1, 1, 1)

    with replaced_output_head(head, fn) as state:
        yield state


def completion_logps_chunked(model, batch: Batch, *, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`megakto.model.forward.completion_logps`, without full logits.

    ``model`` is an HF causal LM or a DeepSpeed engine wrapping one (called as given, so the
    engine's hooks run). Returns (B,) summed completion log-probs (fp32) and (B,) token counts.
    """
    head = output_head(model)
    with chunked_output_head(head, batch.input_ids, batch.completion_mask, chunk_size=chunk_size) as state:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    logps = check_head_output(model, logits, state, batch.input_ids.shape[0])
    return logps, batch.completion_mask[:, 1:].bool().sum(-1)
