"""Build policy and reference from a Hugging Face folder; forward -> completion log-probs."""

from megakto.model.tiny import make_tiny_model

__all__ = ["make_tiny_model"]
