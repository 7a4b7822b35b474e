"""Build policy and reference from a Hugging Face folder; forward -> completion log-probs."""

__all__: list[str] = []
