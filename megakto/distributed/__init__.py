"""Everything that talks to other ranks: ``comm`` (the only torch.distributed user), ``engine``
(the DeepSpeed layer's public names; its private package ``_deepspeed`` holds the only modules
that import deepspeed), ``parallel`` (degrees and batch arithmetic), ``sharded`` (rows split over
the data-parallel ranks, equal forward calls on each), ``vocab_parallel`` (the reducers of a
vocabulary-parallel head) and ``ds_config``.

Submodules are imported explicitly (``from megakto.distributed import comm``) so that importing
the pure ones never loads deepspeed."""

__all__ = ["comm", "engine", "parallel", "sharded", "vocab_parallel", "ds_config"]
