"""Everything that talks to other ranks: ``comm`` (the only torch.distributed user), ``engine``
(the only deepspeed importer), ``parallel`` (degrees and batch arithmetic), ``sharded`` (rows
split over the data-parallel ranks, equal forward calls on each) and ``ds_config``.

Submodules are imported explicitly (``from megakto.distributed import comm``) so that importing
the pure ones never loads deepspeed."""

__all__ = ["comm", "engine", "parallel", "sharded", "ds_config"]
