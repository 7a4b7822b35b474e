"""Swapping a Hugging Face causal LM's output head for one call, so log-probs come out instead of
logits.

The model's own forward is kept (attention masks, position ids, every architecture detail); only
the output embedding's forward is swapped, for one call, with a function of the final hidden
states and the head weight (:func:`megakto.model.forward.packed_completion_logps` passes one that
returns summed completion log-probs). That function runs *inside* the module's ``__call__``, which
is what makes it work under DeepSpeed ZeRO-3:

* the engine's pre-forward hook has gathered the partitioned ``lm_head.weight`` (or the tied input
  embedding) by the time ``self.weight`` is read, and the post-forward hook releases it;
* the engine hooks the module's *output* tensor so that backward re-gathers the weight before
  gradients reach it. The log-probs are therefore returned as the module's output, shaped
  (S, 1, 1) so that the model passes them on as ``logits``, and read back from the model output
  (not from a side channel, which would bypass that hook).

Models that transform logits after the head (Gemma's soft-capping, Cohere's logit scale) or that
do not call the head module are detected and refused: the value the model returns must be exactly
the value the head produced.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from megakto.errors import ModelError
from megakto.model.vocab_blocks import BlockedHead

__all__ = ["replaced_output_head", "check_head_output", "output_head"]


def output_head(model) -> torch.nn.Module:
    """The output-embedding module of an HF model, or of the model inside a DeepSpeed engine."""
    inner = model if hasattr(model, "get_output_embeddings") else getattr(model, "module", None)
    has_head = inner is not None and hasattr(inner, "get_output_embeddings")
    head = inner.get_output_embeddings() if has_head else None
    if isinstance(head, BlockedHead):
        return head
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ModelError(
            f"{type(model).__name__} has no output embedding with a .weight; chunked log-probs need one; "
            "set model.logps=full"
        )
    if getattr(head, "bias", None) is not None:
        raise ModelError(
            f"output embedding {type(head).__name__} has a bias; chunked log-probs support bias-free heads only; "
            "set model.logps=full"
        )
    return head


@contextlib.contextmanager
def replaced_output_head(head: torch.nn.Module, fn) -> Iterator[dict]:
    """While active, ``head(hidden)`` returns ``fn(hidden, head)``; the yielded dict records the
    call count and a detached copy of the last result. ``fn`` reads the head's weights (``.weight``,
    or a :class:`~megakto.model.vocab_blocks.BlockedHead`'s blocks) during that call."""
    state = {"calls": 0, "logps": None}

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        # The weights are read inside the module call: under ZeRO-3 they are materialised now.
        result = fn(hidden_states, head)
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
    """The (n,) values the model returned, after checking they are exactly what the head produced.
    NaN counts as equal to NaN: NaN weights or inputs make NaN log-probs, which the trainer skips
    and counts as a non-finite step; they say nothing about the model changing its logits."""
    if (
        state["calls"] != 1
        or tuple(logits.shape) != (n, 1, 1)
        or not torch.allclose(logits.detach().reshape(n).to(state["logps"].dtype), state["logps"].reshape(n),
                              rtol=0.0, atol=0.0, equal_nan=True)
    ):
        raise ModelError(
            f"{type(getattr(model, 'module', model)).__name__} does not return its output head's result "
            f"unchanged (head called {state['calls']} times); chunked log-probs cannot be used with it; "
            "set model.logps=full"
        )
    # The model's output, not state["logps"]: under ZeRO-3 only this tensor carries the engine's
    # backward hook that re-gathers the head weight.
    return logits.reshape(n)
