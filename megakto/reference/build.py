"""``ref.mode`` -> the scorer of reference log-probs for a run: the one call the trainer makes.

* ``online``: the frozen reference weights in a ZeRO-3 inference engine, run every step.
* ``cache``: fingerprint the reference folder, open the cache (rank 0 creates it), let rank 0
  decide which of the run's sequences it lacks, compute those once with a temporary online
  reference sharded over the data-parallel ranks, then read everything from the cache. When the
  cache already holds every sequence, the reference model is never loaded.

In cache mode the KL rows must be a fixed set, or every reshuffle asks for (prompt, completion)
pairs never computed: the trainer gives each row one partner for the whole dataset
(:func:`megakto.data.kl_pairs.dataset_kl_partners`, a fixed seed so runs with different seeds
share the cache) and passes every target and KL row of train and eval as ``sequences``
(:mod:`megakto.reference.sequences`: keys and lengths in numpy, token ids read on demand, so no
rank holds the dataset's ids). Each step still runs the policy on the KL rows; only the reference
side comes from the cache.

The online scorer is passed in as a factory, so another way to run the reference (a pipeline
engine, the policy with its adapters off) gets the cache too without a change here.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch

from megakto.data.batcher import Batcher
from megakto.distributed import comm, engine
from megakto.distributed.ds_config import reference_ds_config
from megakto.errors import MegaktoError
from megakto.reference.fingerprint import reference_fingerprint
from megakto.reference.precompute import missing_positions, precompute
from megakto.reference.scorers import CachedReference, OnlineReference, Reference
from megakto.reference.sequences import Sequences
from megakto.reference.store import RefLogpCache

__all__ = ["build_reference", "online_reference"]

def online_reference(ref, model, ds_config: dict, *, dtype: torch.dtype, batcher: Batcher,
                     logps_fn: Callable) -> OnlineReference:
    """The reference weights (``ref.path``, else ``model.path``) in a frozen ZeRO-3 inference engine
    beside the policy's ``ds_config``; ``ref.offload`` decides where its parameters live."""
    ref_ds = reference_ds_config(ds_config, offload=ref.offload, on_gpu=engine.on_gpu())
    module = engine.load_model(ref.path or model.path, ref_ds, dtype=dtype,
                               attn_implementation=model.attn_implementation,
                               trust_remote_code=model.trust_remote_code, vocab_block_rows=model.vocab_block_rows)
    engine.disable_dropout(module)
    return OnlineReference(engine.build_reference_engine(module, ref_ds), batcher, logps_fn)


def build_reference(ref, model, *, dtype: torch.dtype, online: Callable[[], Reference],
                    sequences: Callable[[], Sequences], batch_size: int, dp_rank: int, dp_size: int,
                    device, log: Callable[[str], None], dp_group: comm.ProcessGroup,
                    writes: bool = True) -> Reference:
    """The scorer for ``ref.mode`` (``ref``, ``model``: the config's sections).

    ``online()`` loads the online scorer. ``sequences()`` (called in cache mode only) gives every
    (prompt_ids, completion_ids) the run will ask the reference for. The precompute scores
    ``batch_size`` rows per forward on data-parallel rank ``dp_rank`` of ``dp_size`` (group
    ``dp_group``); ``writes``: this rank stores its share (one rank of each tensor-parallel group
    does, its peers computed the same values). Collective: every rank calls it.
    """
    if ref.mode != "cache":
        return online()
    with comm.fail_together(group=comm.world_group()):
        fingerprint = reference_fingerprint(ref.path or model.path, settings={
            "dtype": str(dtype), "attn": model.attn_implementation, "logps": model.logps})
        if comm.is_main():
            RefLogpCache.open(ref.cache_dir, fingerprint, create=True)
    with comm.fail_together(group=comm.world_group()):
        cache = RefLogpCache.open(ref.cache_dir, fingerprint, create=False)
    start = time.perf_counter()
    seqs = sequences()
    # Each data-parallel rank hashes its share of the rows; one all-gather assembles every key.
    seqs.fill_keys(dp_rank, dp_size, gather=lambda mine: comm.all_gather_object(mine, group=dp_group))
    log(f"reference cache: keys of {len(seqs):,} sequences in {time.perf_counter() - start:.1f} s "
        f"(each of {dp_size} data-parallel ranks hashed its share)")
    # Rank 0 decides what is missing: ranks that saw different folder contents (another job
    # writing, a lagging network filesystem) would otherwise run different numbers of forwards.
    # Every rank computed the same positions, so rank 0 sends positions (8 bytes each), not rows.
    with comm.others_wait(f"rank 0 looks up which of {len(seqs):,} sequences {ref.cache_dir} lacks", log):
        todo = missing_positions(cache, seqs) if comm.is_main() else None
    todo = comm.broadcast_object(todo, group=comm.world_group())
    seconds = 0.0
    if len(todo):
        start = time.perf_counter()
        scorer = online()
        n = precompute(cache, seqs, scorer.logps, rank=dp_rank, world_size=dp_size, batch_size=batch_size, todo=todo,
                       write=writes)
        comm.barrier(group=comm.world_group())
        cache.reload()
        if hasattr(scorer, "release"):  # an engine of its own (not the policy with adapters off)
            scorer.release()
        del scorer  # the last reference: gc frees the engine and its partition now
        gc.collect()
        seconds = time.perf_counter() - start
        log(f"reference cache: computed {int(comm.all_reduce_dict({'n': n}, group=dp_group)['n'])} log-probs "
            f"in {seconds:.1f} s into {ref.cache_dir}")
    with comm.fail_together(group=comm.world_group()):
        missing = cache.missing(seqs.keys)
        if len(missing):
            raise MegaktoError(f"ref.cache_dir={ref.cache_dir}: {len(missing)} of {len(seqs)} reference "
                               "log-probs missing after the precompute pass; is the folder shared by all nodes?")
    log(f"reference cache: {len(seqs)} log-probs from {ref.cache_dir}; reference model not loaded")
    return CachedReference(cache, device, precompute_seconds=seconds)
