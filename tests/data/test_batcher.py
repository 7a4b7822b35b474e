"""The run's batcher: a micro-batch's pairs -> the packed (or padded) model input, settings fixed
when the run is set up (megakto/data/batcher.py)."""

import torch

from megakto.config import load_config
from megakto.data.batcher import Batcher

PAIRS = [([1, 2], [3]), ([4], [5, 6, 7]), ([8, 9, 10], [11, 12])]


def _fields(batch):
    return [batch.input_ids, batch.position_ids, batch.completion_mask, batch.segment_ids]


def test_packed_rows_share_a_row_within_the_budget():
    """Lengths 3, 4, 5 in rows of 8 tokens, first fit longest first: 5 opens row 0 (3 left), 4
    opens row 1, 3 fits row 0 -> [5, 3], [4 + 4 pads]."""
    batch = Batcher(pad_id=0, packing=True, max_tokens_per_row=8)(PAIRS)
    assert batch.input_ids.tolist() == [[8, 9, 10, 11, 12, 1, 2, 3], [4, 5, 6, 7, 0, 0, 0, 0]]
    assert batch.segment_ids.tolist() == [[2, 2, 2, 2, 2, 0, 0, 0], [1, 1, 1, 1, -1, -1, -1, -1]]
    assert batch.completion_mask.tolist() == [[0, 0, 0, 1, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0, 0, 0]]
    assert batch.num_segments == 3 and batch.num_tokens == 12


def test_unpacked_is_one_sequence_a_row_padded_to_the_longest():
    batch = Batcher(pad_id=99, packing=False, max_tokens_per_row=8)(PAIRS)
    assert batch.input_ids.tolist() == [[1, 2, 3, 99, 99], [4, 5, 6, 7, 99], [8, 9, 10, 11, 12]]
    assert batch.segment_ids[:, 0].tolist() == [0, 1, 2]


def test_the_run_settings_and_the_host_layout():
    cfg = load_config(None, ["model.path=unused", "data.train_files=unused", "data.max_length=6",
                             "data.max_tokens_per_row=16", "data.packing=false"])
    batcher = Batcher.for_run(cfg.data, pad_id=7, device=torch.device("cpu"))
    assert (batcher.pad_id, batcher.packing, batcher.max_tokens_per_row) == (7, False, 16)
    on_device, on_host = batcher(PAIRS), batcher.layout(PAIRS)  # the dry run reads the host layout
    assert all(torch.equal(a, b) for a, b in zip(_fields(on_device), _fields(on_host)))
