"""Start-up steps shared by the trainer and the dry run (``launch/train_kto.py --dry-run``), so both
load data, draw KL rows and check the sampler with the same code and the same one-line errors.
No process group here: the trainer decides which ranks call what."""

from __future__ import annotations

import time

from megakto.config import Config
from megakto.data import KTOBatchSampler, count_labels, kl_partners, load_rows, require_both_classes, tokenize_rows
from megakto.data.kl_pairs import fit_kl_row
from megakto.data.split import TokenizedSplit
from megakto.data.tokenize import auto_num_proc
from megakto.errors import DataError

__all__ = ["load_split", "make_sampler", "step_kl_rows"]


def load_split(cfg: Config, files: list[str], tokenizer, *, train: bool):
    """Load, validate and tokenize one split; the train split must hold both classes (unless the
    loss or ``kto.allow_single_class`` says otherwise). Returns (TokenizedSplit, tokenization
    report, a line with the read and tokenize times). ``data.num_proc: null`` picks the tokenizing
    processes from the row count (:func:`~megakto.data.tokenize.auto_num_proc`)."""
    start = time.perf_counter()
    rows = load_rows(list(files))
    read = time.perf_counter()
    num_proc = cfg.data.num_proc or auto_num_proc(len(rows))
    tok, report = tokenize_rows(rows, tokenizer, max_length=cfg.data.max_length,
                                max_prompt_length=cfg.data.max_prompt_length, num_proc=num_proc)
    done = time.perf_counter()
    timing = (f"{len(rows):,} rows read in {read - start:.1f} s, tokenized and checked in {done - read:.1f} s "
              f"({len(rows) / max(done - read, 1e-9):,.0f} rows/s, data.num_proc={num_proc}; datasets reuses "
              "both on the next run)")
    if train:
        n_d, n_u = count_labels(tok)
        require_both_classes(n_d, n_u, loss_type=cfg.kto.loss_type, allow_single_class=cfg.kto.allow_single_class,
                             source=", ".join(files))
    return TokenizedSplit(tok), report, timing


def make_sampler(cfg: Config, train_rows: TokenizedSplit) -> KTOBatchSampler:
    n, gbs = len(train_rows), cfg.train.global_batch_size
    if n < gbs:
        raise DataError(f"{', '.join(cfg.data.train_files)}: {n} rows after filtering, fewer than "
                        f"train.global_batch_size={gbs}")
    return KTOBatchSampler(train_rows.label, global_batch_size=gbs, seed=cfg.seed, balanced=cfg.data.balanced_sampling)


def step_kl_rows(cfg: Config, train_rows: TokenizedSplit, indices: list[int], rows: dict, step: int,
                 fixed_partner: list[int] | None) -> list:
    """The KL rows of one global batch. Online reference: partners drawn over this global batch,
    seeded by the step. Cached reference (``fixed_partner``): each row's fixed dataset-level partner."""
    data = cfg.data

    def fit(p, c):
        return fit_kl_row(p, c, data.max_length, data.max_prompt_length)

    if fixed_partner is None:
        # Drawn over the batch in dataset-index order, so the pairs (and z_ref) depend on which
        # rows the step holds, not on how the sampler arranged them for a micro-batch size.
        order = sorted(range(len(indices)), key=lambda i: (indices[i], i))
        drawn = kl_partners([rows["prompt_key"][i] for i in order], seed=cfg.seed, step=step)
        partners = [0] * len(indices)
        for k, j in enumerate(drawn):
            partners[order[k]] = order[j]
        return [fit(rows["prompt_ids"][i], rows["completion_ids"][j]) for i, j in enumerate(partners)]
    partner_completions = train_rows.fetch([fixed_partner[i] for i in indices])["completion_ids"]
    return [fit(p, c) for p, c in zip(rows["prompt_ids"], partner_completions)]
