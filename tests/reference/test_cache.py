"""The content-keyed reference log-prob cache: fingerprint, keys, shards, sharded precompute."""

import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from megakto.errors import ConfigError, MegaktoError
from megakto.reference import RefLogpCache, fingerprint, reference_fingerprint, sequence_key
from megakto.reference.precompute import missing_positions, precompute
from megakto.reference.sequences import PairSequences

ROOT = Path(__file__).resolve().parents[2]
FP = "a" * 64


def _model_dir(path: Path, n: int = 1000) -> Path:
    """A tiny reference folder: config.json and one safetensors file with two float32 tensors."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    w = np.arange(n, dtype=np.float32) / 7.0
    save_file({"embed.weight": w, "norm.weight": np.ones(8, dtype=np.float32)},
              str(path / "model.safetensors"))
    return path


def _data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0x01]))


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------------------- fingerprint

def test_fingerprint_stable_and_identical_for_a_copy(tmp_path):
    d = _model_dir(tmp_path / "ref")
    fp = reference_fingerprint(str(d))
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert reference_fingerprint(str(d)) == fp
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(d, copy)
    assert reference_fingerprint(str(copy)) == fp


def test_fingerprint_changes_when_one_weight_value_changes(tmp_path):
    d = _model_dir(tmp_path / "ref")
    before = reference_fingerprint(str(d))
    header = (d / "model.safetensors").read_bytes()[:_data_start(d / "model.safetensors")]
    tensors = load_file(str(d / "model.safetensors"))
    tensors["embed.weight"][500] += 1e-3  # one value; the file is < 64 KiB, all of it sampled
    save_file(tensors, str(d / "model.safetensors"))
    # Same header (names, dtypes, shapes, offsets) and size: only the tensor bytes can tell.
    assert (d / "model.safetensors").read_bytes()[:len(header)] == header
    assert reference_fingerprint(str(d)) != before


def test_fingerprint_changes_with_config_and_settings(tmp_path):
    d = _model_dir(tmp_path / "ref")
    before = reference_fingerprint(str(d))
    assert reference_fingerprint(str(d), settings={"dtype": "bfloat16"}) != before
    assert (reference_fingerprint(str(d), settings={"dtype": "bfloat16"})
            != reference_fingerprint(str(d), settings={"dtype": "float32"}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    assert reference_fingerprint(str(d)) != before


def test_fingerprint_samples_first_last_and_strided_bytes(tmp_path, monkeypatch):
    """A 1 MiB tensor: data bytes [0, 64 Ki) and [1 Mi + 32 - 64 Ki, end) are sampled with the
    real 64 MiB stride; a flip at data offset 512 Ki is outside both (documented blind spot) and
    only full=True sees it. With the stride shrunk to 256 Ki, offsets 256 Ki and 512 Ki are
    sampled, so the same flip is seen."""
    d = _model_dir(tmp_path / "ref", n=1 << 18)  # 262144 float32 = 1 MiB, plus 8 ones (32 B)
    st = d / "model.safetensors"
    start = _data_start(st)
    sampled, full = reference_fingerprint(str(d)), reference_fingerprint(str(d), full=True)
    assert sampled != full  # the two modes never share a fingerprint

    _flip_byte(st, start + (512 << 10) + 3)
    assert reference_fingerprint(str(d)) == sampled
    assert reference_fingerprint(str(d), full=True) != full
    monkeypatch.setattr(fingerprint, "_STRIDE", 256 << 10)
    strided = reference_fingerprint(str(d))
    _flip_byte(st, start + (512 << 10) + 3)  # back to the original bytes
    assert reference_fingerprint(str(d)) != strided
    monkeypatch.undo()
    assert reference_fingerprint(str(d)) == sampled

    for offset in (start + 100, os.path.getsize(st) - 5):  # first and last 64 KiB
        _flip_byte(st, offset)
        assert reference_fingerprint(str(d)) != sampled
        _flip_byte(st, offset)
    assert reference_fingerprint(str(d)) == sampled


def test_fingerprint_bin_only_folder_and_hub_name(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(bytes(range(256)) * 10)
    fp = reference_fingerprint(str(d))
    _flip_byte(d / "pytorch_model.bin", 1000)
    assert reference_fingerprint(str(d)) != fp

    with pytest.raises(ConfigError) as err:
        reference_fingerprint("meta-llama/Llama-3.1-8B")
    text = _one_line(err)
    assert "ref.mode=cache" in text and "local" in text and "meta-llama/Llama-3.1-8B" in text


# ------------------------------------------------------------------------------- keys

def test_sequence_key_format_and_split():
    """Key = blake2b-128(person "megakto.refkey1") over int64 LE: len(p), len(c), p..., c...."""
    by_hand = hashlib.blake2b(struct.pack("<qq", 3, 2) + struct.pack("<5q", 1, 2, 3, 4, 5),
                              digest_size=16, person=b"megakto.refkey1").digest()
    key = sequence_key([1, 2, 3], [4, 5])
    assert key == by_hand and len(key) == 16
    assert key.hex() == "48d78eb8aa8c36820d936e29ae90fcd8"  # pinned: a new scheme misses old caches
    # Same content, any container and integer width: same key.
    assert sequence_key(np.array([1, 2, 3], dtype=np.int32), torch.tensor([4, 5])) == key
    # The same five tokens split elsewhere are a different log-prob, so a different key.
    assert sequence_key([1, 2], [3, 4, 5]) != key
    assert sequence_key([1, 2, 3, 4], [5]) != key
    assert sequence_key([], [1, 2, 3, 4, 5]) != sequence_key([1, 2, 3, 4, 5], [])


# ------------------------------------------------------------------------------- cache

VALUES = [-math.pi, -1234.5678901234567, -1 / 3, -5e-300, 0.0]


def _keys(n, base=0):
    return [sequence_key([base + i], [7, base + i]) for i in range(n)]


def test_round_trip_is_bit_exact(tmp_path):
    cache = RefLogpCache.open(str(tmp_path / "c"), FP, create=True)
    keys = _keys(5)
    path = cache.write_shard(keys, torch.tensor(VALUES, dtype=torch.float64), "rank0")
    assert os.path.basename(path) == "shard-rank0-0.safetensors"
    assert len(cache) == 0  # visible after reload, not before
    cache.reload()
    assert len(cache) == 5
    got = cache.lookup(list(reversed(keys)))
    assert got.dtype == torch.float64
    assert [x.hex() for x in got.tolist()] == [x.hex() for x in reversed(VALUES)]
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["fingerprint"] == FP and meta["format"] == 1 and meta["created"]
    # Reopening reads the shards; no temporary files are left behind.
    again = RefLogpCache.open(str(tmp_path / "c"), FP, create=False)
    assert again.lookup(keys).tolist() == VALUES
    assert sorted(os.listdir(tmp_path / "c")) == ["meta.json", "shard-rank0-0.safetensors"]


def test_two_writers_merge_on_reload_and_never_clobber(tmp_path):
    d = str(tmp_path / "c")
    a = RefLogpCache.open(d, FP, create=True)
    b = RefLogpCache.open(d, FP, create=False)
    a.write_shard(_keys(3), torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64), "rank0")
    b.write_shard(_keys(2, base=100), torch.tensor([-10.0, -20.0], dtype=torch.float64), "rank1")
    second = a.write_shard(_keys(1, base=200), torch.tensor([-30.0], dtype=torch.float64), "rank0")
    assert os.path.basename(second) == "shard-rank0-1.safetensors"
    for c in (a, b):
        c.reload()
        assert len(c) == 6
        assert c.lookup(_keys(2, base=100) + _keys(3) + _keys(1, base=200)).tolist() == [
            -10.0, -20.0, -1.0, -2.0, -3.0, -30.0]


def test_missing_keys_raise_with_the_count(tmp_path):
    cache = RefLogpCache.open(str(tmp_path / "c"), FP, create=True)
    cache.write_shard(_keys(3), torch.tensor([-1.0, -2.0, -3.0]), "rank0")
    cache.reload()
    asked = _keys(3) + _keys(2, base=50)
    assert cache.missing(asked).tolist() == [3, 4]
    assert cache.missing(_keys(3)).tolist() == []
    with pytest.raises(MegaktoError) as err:
        cache.lookup(asked)
    text = _one_line(err)
    assert "2 of 5 sequences" in text and "rebuilt" in text
    empty = RefLogpCache.open(str(tmp_path / "e"), FP, create=True)
    assert empty.missing(_keys(2)).tolist() == [0, 1]
    with pytest.raises(MegaktoError, match="2 of 2 sequences"):
        empty.lookup(_keys(2))


def test_fingerprint_mismatch_and_absent_cache(tmp_path):
    d = str(tmp_path / "c")
    RefLogpCache.open(d, FP, create=True)
    other = "b" * 64
    with pytest.raises(MegaktoError) as err:
        RefLogpCache.open(d, other, create=True)
    text = _one_line(err)
    assert "aaaaaaaaaaaa" in text and "bbbbbbbbbbbb" in text and d in text
    assert "delete" in text and "ref.cache_dir" in text
    with pytest.raises(MegaktoError, match="no meta.json"):
        RefLogpCache.open(str(tmp_path / "nothing"), FP, create=False)


def test_conflicting_duplicates_are_corruption(tmp_path):
    d = str(tmp_path / "c")
    cache = RefLogpCache.open(d, FP, create=True)
    cache.write_shard(_keys(2), torch.tensor([-1.0, -2.0], dtype=torch.float64), "rank0")
    cache.write_shard(_keys(1), torch.tensor([-1.0 + 1e-9], dtype=torch.float64), "rank1")
    cache.reload()  # within 1e-6: the same number; the first shard's value is kept
    assert len(cache) == 2 and cache.lookup(_keys(1)).tolist() == [-1.0]
    cache.write_shard(_keys(2)[1:], torch.tensor([-2.5], dtype=torch.float64), "rank2")
    with pytest.raises(MegaktoError) as err:
        cache.reload()
    text = _one_line(err)
    assert "corrupt" in text and "shard-rank0-0" in text and "shard-rank2-0" in text and "0.5" in text


def test_unreadable_or_foreign_shards_raise(tmp_path):
    d = tmp_path / "c"
    cache = RefLogpCache.open(str(d), FP, create=True)
    path = cache.write_shard(_keys(2), torch.tensor([-1.0, -2.0]), "rank0")
    save_file({"keys": np.zeros((1, 16), np.uint8), "logps": np.zeros(1)},
              str(d / "shard-x-0.safetensors"), metadata={"fingerprint": "c" * 64})
    with pytest.raises(MegaktoError, match="shard-x-0.*cccccccccccc"):
        cache.reload()
    os.unlink(d / "shard-x-0.safetensors")
    Path(path).write_bytes(Path(path).read_bytes()[:40])  # truncated
    with pytest.raises(MegaktoError, match="shard-rank0-0.safetensors: bad reference-cache shard"):
        cache.reload()
    with pytest.raises(MegaktoError, match="not finite"):
        cache.write_shard(_keys(1), torch.tensor([float("nan")]), "rank0")


# ------------------------------------------------------------------------------- precompute

def _rows(n):
    """n distinct (prompt, completion) rows of varied length."""
    return [([1, i % 5], [i] * (1 + i % 4)) for i in range(n)]


def _score(p, c):
    return -float(sum(c)) / (len(p) + 1) - 0.125 * len(c)


class _Scorer:
    def __init__(self):
        self.rows, self.calls = [], 0

    def __call__(self, batch):
        self.calls += 1
        self.rows += [(tuple(p), tuple(c)) for p, c in batch]
        return torch.tensor([_score(p, c) for p, c in batch], dtype=torch.float64)


def test_precompute_over_three_ranks_computes_each_missing_key_once(tmp_path):
    d = str(tmp_path / "c")
    rows = _rows(14)
    items = [(sequence_key(p, c), p, c) for p, c in rows]
    cache = RefLogpCache.open(d, FP, create=True)
    cache.write_shard([k for k, _, _ in items[:2]],  # 2 already cached: 12 missing
                      torch.tensor([_score(p, c) for _, p, c in items[:2]], dtype=torch.float64), "old")
    cache.reload()
    asked = PairSequences(rows + rows[5:9])  # duplicates are asked for once
    scorers = [_Scorer() for _ in range(3)]
    counts = [precompute(cache, asked, scorers[r], rank=r, world_size=3, batch_size=2) for r in range(3)]
    # 12 missing over 3 ranks: 4 each, 2 calls of 2 rows each.
    assert counts == [4, 4, 4] and [s.calls for s in scorers] == [2, 2, 2]
    computed = [row for s in scorers for row in s.rows]
    assert sorted(computed) == sorted((tuple(p), tuple(c)) for p, c in rows[2:])
    # Rank r's rows are every third of the missing keys in key order.
    order = sorted(k for k, _, _ in items[2:])
    by_key = {k: (tuple(p), tuple(c)) for k, p, c in items}
    for r, s in enumerate(scorers):
        assert sorted(s.rows) == sorted(by_key[k] for k in order[r::3])

    cache.reload()  # after the barrier in the trainer
    assert len(cache) == 14
    want = torch.tensor([_score(p, c) for p, c in rows], dtype=torch.float64)
    assert torch.equal(cache.lookup([k for k, _, _ in items]), want)
    names = sorted(os.listdir(d))
    assert names == ["meta.json", "shard-old-0.safetensors", "shard-rank0-0.safetensors",
                     "shard-rank1-0.safetensors", "shard-rank2-0.safetensors"]

    again = _Scorer()
    assert precompute(cache, asked, again, rank=1, world_size=3, batch_size=2) == 0
    assert len(missing_positions(cache, asked)) == 0
    assert again.calls == 0


def test_precompute_makes_the_same_number_of_calls_on_every_rank(tmp_path):
    """7 missing keys over 3 ranks at batch 1: shares 3, 2, 2, but ZeRO-3 forwards are collective,
    so ranks 1 and 2 make a third call on a filler row whose result is dropped."""
    cache = RefLogpCache.open(str(tmp_path / "c"), FP, create=True)
    items = [(sequence_key(p, c), p, c) for p, c in _rows(7)]
    scorers = [_Scorer() for _ in range(3)]
    counts = [precompute(cache, PairSequences(_rows(7)), scorers[r], rank=r, world_size=3, batch_size=1,
                         flush_every=1) for r in range(3)]
    assert counts == [3, 2, 2] and [s.calls for s in scorers] == [3, 3, 3]
    cache.reload()
    assert len(cache) == 7 and len(cache.missing([k for k, _, _ in items])) == 0
    # flush_every=1: one shard per computed row, the filler never written.
    assert len([n for n in os.listdir(tmp_path / "c") if n.startswith("shard-")]) == 7
    # Longest row first on each rank.
    lengths = [len(p) + len(c) for p, c in scorers[0].rows]
    assert lengths == sorted(lengths, reverse=True)


@pytest.mark.gloo
def test_another_process_reads_the_same_values(tmp_path):
    d = str(tmp_path / "c")
    cache = RefLogpCache.open(d, FP, create=True)
    keys = _keys(5)
    cache.write_shard(keys, torch.tensor(VALUES, dtype=torch.float64), "rank0")
    code = ("import json, sys\nfrom megakto.reference import RefLogpCache\n"
            "keys = [bytes.fromhex(h) for h in json.loads(sys.argv[2])]\n"
            "c = RefLogpCache.open(sys.argv[1], 'a' * 64, create=False)\n"
            "print(json.dumps([x.hex() for x in c.lookup(keys).tolist()]))\n")
    out = subprocess.run([sys.executable, "-c", code, d, json.dumps([k.hex() for k in keys])],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [x.hex() for x in VALUES]
