"""Every generator's state as plain types (``torch.load(weights_only=True)`` reads them back), and
the derived states of a resume whose ranks are not the ones that saved."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

from megakto.distributed import engine

__all__ = ["rng_state", "set_rng_state", "derive_rng_state"]


def rng_state() -> dict:
    """This process's generator states: python, numpy, torch CPU and the accelerator's."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "accelerator": engine.accelerator_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    engine.set_accelerator_rng_state(state["accelerator"])


def derive_rng_state(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy, torch and the accelerator from (seed, step, rank): a resume at another
    number of ranks cannot give each rank a saved state, so every rank derives one the same way on
    every run (sha256, never the per-process ``hash``)."""
    digest = hashlib.sha256(f"megakto.rng:{seed}:{step}:{rank}".encode()).digest()
    value = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    random.seed(value)
    np.random.seed(value % (1 << 32))
    torch.manual_seed(value)  # every device's generator too
