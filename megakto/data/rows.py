"""Load and check KTO rows: one ``(prompt, completion, label)`` per row, or one conversation.

This is TRL's unpaired-preference format. ``label`` is true for a desirable completion and false
for an undesirable one (KTO, Ethayarajh et al. 2024, sec. 3: each example is judged on its own, no
paired alternative needed). ``prompt`` and ``completion`` are either plain strings or, for chat
data, lists of ``{"role", "content"}`` messages.

Loading is left to ``datasets`` (JSON lines, JSON, Parquet, CSV, ``save_to_disk`` folders, hub
names); this module only checks what came back, so a bad row fails here with the file, the row and
the field, rather than as a shape error deep inside a training step. A text file that fails to
load, or holds bytes that are not UTF-8, is then scanned for the line to blame (``_file_errors``).

Row numbers are 1-based positions within their source: the n-th object of a JSON lines file, the
n-th data row of a CSV file (the header is not a row).

A source with a ``messages`` column and no ``prompt`` holds conversations (``{"messages": [...],
"label": bool}``, optionally ``tools``; or labels on the assistant turns instead of the row):
checked by megakto/data/_messages.py and kept as one JSON string per row in a ``conversation``
column, turned into examples when tokenized (megakto/data/conversations.py).

An optional ``weight`` column (a finite number >= 0) scales the row's loss term (see
:func:`megakto.kto.loss.kto_loss`); a source without the column gives its rows weight 1, and when no
source has one the column is left out, so unweighted data loads exactly as before.
"""

from __future__ import annotations

import json
import math
import os

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from megakto.data import _file_errors
from megakto.data._messages import check_conversation, conversation_json, is_conversation_source
from megakto.errors import DataError

__all__ = ["load_rows", "read_source", "count_labels", "require_both_classes"]

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_FIELDS = ("prompt", "completion", "label")
_CHECK_BATCH = 10_000
_MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})


def load_rows(sources: str | list[str]) -> datasets.Dataset:
    """Load, check and concatenate every source into one dataset.

    Columns: prompt, completion, label (bool), source (the name as given), row (1-based), and
    weight (float64) when any source has a ``weight`` column. Text columns are strings when every row is plain text, lists of {role, content} messages when
    every row is a chat, and ``datasets.Json`` (each row decodes to its own kind) when sources mix
    the two.
    """
    names = [sources] if isinstance(sources, str) else list(sources)
    if not names:
        raise DataError("no data sources given")
    checked = []
    kinds = set()
    for name in names:
        ds = read_source(name)
        try:
            if is_conversation_source(ds.column_names):
                _check_conversations(ds, name)
            else:
                kinds |= _check_rows(ds, name)
            _check_weights(ds, name)
        except UnicodeDecodeError as err:  # pyarrow's JSON reader keeps bytes that are not UTF-8
            raise DataError(f"{name}: cannot be loaded ({_where_not_utf8(name, ds, err)})") from None
        checked.append((name, ds))
    text = (datasets.Value("string") if kinds <= {"text"}
            else _MESSAGES if kinds == {"chat"} else datasets.Json())
    weighted = any("weight" in ds.column_names for _, ds in checked)
    conversations = any(is_conversation_source(ds.column_names) for _, ds in checked)
    features = datasets.Features({
        "prompt": text, "completion": text, "label": datasets.Value("bool"),
        "source": datasets.Value("string"), "row": datasets.Value("int64"),
        **({"weight": datasets.Value("float64")} if weighted else {}),
        **({"conversation": datasets.Value("string")} if conversations else {})})
    parts = []
    for name, ds in checked:
        conv = is_conversation_source(ds.column_names)
        fields = ["messages", "label", "tools"] if conv else list(_FIELDS)
        fields = [f for f in fields if f in ds.column_names] + (["weight"] if "weight" in ds.column_names else [])
        parts.append(ds.map(
            _normalize, batched=True, with_indices=True,
            fn_kwargs={"source": name, "weighted": weighted, "conversations": conversations, "fields": fields,
                       "empty": [] if text == _MESSAGES else ""},
            input_columns=fields, remove_columns=ds.column_names, features=features, desc=f"rows of {name}"))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def read_source(source: str) -> datasets.Dataset:
    """Open one source with ``datasets``, without checking its columns."""
    path = os.path.expanduser(source)
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        if _is_saved_dataset(path):
            if _saved_without_data(path):  # datasets writes 0 shards for 0 rows, then can't load it
                raise DataError(f"{source}: no rows")
            ds = _load(source, datasets.load_from_disk, path)
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{source}: saved DatasetDict has no 'train' split "
                                    f"(splits: {', '.join(ds)})")
                ds = ds["train"]
        else:  # a folder of data files: let datasets pick the builder
            ds = _load(source, datasets.load_dataset, path, split="train")
    elif ext in _BUILDERS:
        if not os.path.isfile(path):
            raise DataError(f"{source}: file not found")
        if os.path.getsize(path) == 0:
            raise DataError(f"{source}: no rows (the file is empty)")
        # CSV: an empty cell is an empty string, not a missing value (pandas' default).
        extra = {"na_filter": False} if ext == ".csv" else {}
        ds = _load(source, datasets.load_dataset, _BUILDERS[ext], data_files=path, split="train",
                   locate=(path, ext), **extra)
    elif os.path.exists(path):
        raise DataError(f"{source}: unsupported file type {ext or '(none)'!r}; expected "
                        f"{', '.join(_BUILDERS)}, a save_to_disk folder or a hub dataset name")
    elif source.startswith(("/", "./", "../", "~")):
        raise DataError(f"{source}: file not found")
    else:
        ds = _load(source, datasets.load_dataset, source, split="train")
    if len(ds) == 0:
        raise DataError(f"{source}: no rows")
    return ds


def count_labels(ds: datasets.Dataset) -> tuple[int, int]:
    """(n_desirable, n_undesirable) over the ``label`` column."""
    labels = ds.with_format("arrow")["label"]
    n_desirable = pc.sum(pc.cast(labels, pa.int64())).as_py() or 0
    return n_desirable, len(ds) - n_desirable


def require_both_classes(n_desirable: int, n_undesirable: int, *, loss_type: str,
                         allow_single_class: bool, source: str) -> None:
    """Refuse single-class data for ``loss_type="kto"`` unless explicitly allowed.

    KTO's desirable/undesirable weights (eq. 8) balance two classes; with one class there is
    nothing to balance, and in practice the run is usually a mislabelled file (e.g. every label
    parsed as true). APO-zero-unpaired anchors each class at zero on its own, so it never needs
    both.
    """
    if loss_type != "kto" or allow_single_class:
        return
    n = n_desirable + n_undesirable
    if n == 0:
        raise DataError(f"{source}: no rows")
    if n_desirable and n_undesirable:
        return
    which = "desirable (label true)" if n_desirable else "undesirable (label false)"
    raise DataError(f"{source}: all {n} rows are {which}; KTO needs both classes (eq. 8 weighs "
                    f"one against the other); set kto.allow_single_class=true to train anyway")


def _load(source, fn, *args, locate=None, **kwargs):
    """Call a datasets loader and turn any failure into a one-line DataError naming the source,
    and for a text file ``locate=(path, ext)`` the line it breaks on."""
    try:
        return fn(*args, **kwargs)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the first line only
        if "corresponds to no data" in str(err):  # datasets' way of saying the split is empty
            raise DataError(f"{source}: no rows") from err
        found = _file_errors.locate(*locate, err) if locate else None
        if found:
            raise DataError(f"{source}: cannot be loaded ({found})") from err
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        detail = f"{type(err).__name__}: {first[:200]}" if first else type(err).__name__
        raise DataError(f"{source}: cannot be loaded ({detail})") from err


def _where_not_utf8(source: str, ds: datasets.Dataset, err: UnicodeDecodeError) -> str:
    """The line of a text file, or else the row, that holds a string that is not UTF-8."""
    path = os.path.expanduser(source)
    found = _file_errors.bad_utf8(path) if os.path.isfile(path) else None
    if found:
        return found
    cols = ds.select_columns(list(_FIELDS))
    for i in range(len(cols)):  # the error path only: one row at a time until it fails again
        try:
            cols[i]
        except UnicodeDecodeError:
            return f"row {i + 1}: a text field is not valid UTF-8"
    return f"a text field is not valid UTF-8 ({err})"


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def _saved_without_data(path: str) -> bool:
    state = os.path.join(path, "state.json")
    if not os.path.isfile(state):
        return False
    with open(state) as f:
        return json.load(f).get("_data_files") == []


def _check_rows(ds: datasets.Dataset, source: str) -> set[str]:
    """Check every row; return the kinds seen ("text", "chat"). Raises on the first bad row.

    A plain python pass over the three columns in batches: well under a second per 100k rows, far
    below the cost of tokenizing them.
    """
    missing = [f for f in _FIELDS if f not in ds.column_names]
    if missing:
        hint = ""
        if {"chosen", "rejected"} <= set(ds.column_names):
            hint = "; paired data? convert it with tools/pairs_to_kto.py"
        raise DataError(f"{source}: row 1: field '{missing[0]}' is missing "
                        f"(columns: {', '.join(ds.column_names)}){hint}")
    kinds = set()
    i = 0
    for cols in ds.select_columns(list(_FIELDS)).iter(batch_size=_CHECK_BATCH):
        for prompt, completion, label in zip(cols["prompt"], cols["completion"], cols["label"]):
            i += 1
            kinds.add(_check_row(prompt, completion, label, source, i))
    return kinds


def _check_weights(ds: datasets.Dataset, source: str) -> None:
    """A ``weight`` column, when there is one, holds a finite number >= 0 in every row."""
    if "weight" not in ds.column_names:
        return
    i = 0
    for cols in ds.select_columns(["weight"]).iter(batch_size=_CHECK_BATCH):
        for w in cols["weight"]:
            i += 1
            _check_weight(w, source, i)


def _check_weight(w, source: str, i: int) -> float:
    """``w`` as a float when it is a finite number >= 0, else a one-line DataError naming the row."""
    ok = isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
    if not ok:
        hint = " (a file with a weight column needs one in every row)" if w is None else ""
        raise DataError(f"{source}: row {i}: field 'weight': expected a finite number >= 0, got {_show(w)}{hint}")
    return float(w)


def _check_conversations(ds: datasets.Dataset, source: str) -> None:
    """Check every conversation row (megakto/data/_messages.py); raises on the first bad one."""
    fields = [f for f in ("messages", "label", "tools") if f in ds.column_names]
    i = 0
    for cols in ds.select_columns(fields).iter(batch_size=_CHECK_BATCH):
        n = len(cols["messages"])
        for messages, label, tools in zip(cols["messages"], cols.get("label", [None] * n),
                                          cols.get("tools", [None] * n)):
            i += 1
            check_conversation(messages, label, tools, source, i, _show)


def _check_row(prompt, completion, label, source: str, i: int) -> str:
    if not (label is True or label is False or (type(label) is int and label in (0, 1))):
        raise DataError(f"{source}: row {i}: field 'label': expected a bool (true/false or 0/1), "
                        f"got {_show(label)}")
    kind = _check_text(prompt, "prompt", source, i)
    if _check_text(completion, "completion", source, i) != kind:
        raise DataError(f"{source}: row {i}: field 'completion': must be the same kind as "
                        f"'prompt' ({'plain text' if kind == 'text' else 'a list of messages'})")
    if kind == "text":
        empty = not completion.strip()
    else:
        empty = not any(m["content"].strip() for m in completion)
    if empty:
        raise DataError(f"{source}: row {i}: field 'completion' is empty")
    return kind


def _check_text(value, field: str, source: str, i: int) -> str:
    if isinstance(value, str):
        return "text"
    if value is None:
        raise DataError(f"{source}: row {i}: field '{field}' is missing or empty")
    if isinstance(value, list):
        for j, m in enumerate(value, start=1):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise DataError(f"{source}: row {i}: field '{field}': message {j}: expected "
                                f"{{\"role\": str, \"content\": str}}, got {_show(m)}")
        return "chat"
    raise DataError(f"{source}: row {i}: field '{field}': expected a string or a list of "
                    f"{{role, content}} messages, got {_show(value)}")


def _show(value) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _normalize(*columns, source, weighted, conversations, fields, empty):
    """Map function: keep role/content of each message, labels as bools, add source and row, the
    weight (1 where the source has none) when some source is weighted, and a conversation row's
    messages and tools as one JSON string (empty prompt and completion beside it)."""
    cols, indices = dict(zip(fields, columns)), columns[-1]
    n = len(indices)

    def norm(value):
        return value if isinstance(value, str) else [
            {"role": m["role"], "content": m["content"]} for m in value]
    if "messages" in cols:
        tools = cols.get("tools", [None] * n)
        out = {"prompt": [empty] * n, "completion": [empty] * n,
               "label": [bool(x) for x in cols["label"]] if "label" in cols else [False] * n,
               "conversation": [conversation_json(m, t) for m, t in zip(cols["messages"], tools)]}
    else:
        out = {"prompt": [norm(p) for p in cols["prompt"]], "completion": [norm(c) for c in cols["completion"]],
               "label": [bool(x) for x in cols["label"]]}
        if conversations:
            out["conversation"] = [None] * n
    out["source"] = [source] * n
    out["row"] = [i + 1 for i in indices]
    if weighted:
        out["weight"] = [float(w) for w in cols["weight"]] if "weight" in cols else [1.0] * n
    return out
