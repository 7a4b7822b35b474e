"""Fixtures for the demo, the benchmarks and the tests: the sorting task's data and a tiny
Llama-architecture model with a locally trained tokenizer. Private (``_demo``): ``tools/`` and
``tests/`` use it; it is not part of what ``import megakto`` offers for real runs."""

from megakto._demo.data import demo_corpus, is_desirable, make_demo_rows, write_demo_data
from megakto._demo.tiny_model import make_tiny_model

__all__ = ["demo_corpus", "is_desirable", "make_demo_rows", "write_demo_data", "make_tiny_model"]
