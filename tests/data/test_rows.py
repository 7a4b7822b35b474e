import json
import time

import datasets
import pytest

from megakto.data.rows import count_labels, load_rows, require_both_classes
from megakto.errors import DataError
from tests.data.conftest import FORMATS, write_rows

ROWS = [
    {"prompt": "the cat", "completion": "sat on the mat", "label": True},
    {"prompt": "a dog", "completion": "ran", "label": False},
    {"prompt": "what is red", "completion": "a hat", "label": False},
    {"prompt": "", "completion": "hello", "label": True},
]
CHAT_ROWS = [
    {"prompt": [{"role": "system", "content": "say yes"}, {"role": "user", "content": "hi"}],
     "completion": [{"role": "assistant", "content": "yes"}], "label": True},
    {"prompt": [{"role": "user", "content": "what is red"}],
     "completion": [{"role": "assistant", "content": "a hat"}], "label": False},
]
LABEL_MSG = "field 'label': expected a bool (true/false or 0/1), got "


def _as_lists(ds):
    return {c: ds[c][:] for c in ds.column_names}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_the_same_rows(write, fmt):
    path = write(ROWS, fmt)
    ds = load_rows(path)
    assert ds.column_names == ["prompt", "completion", "label", "source", "row"]
    assert ds.features["label"] == datasets.Value("bool")
    assert _as_lists(ds) == {
        "prompt": [r["prompt"] for r in ROWS],
        "completion": [r["completion"] for r in ROWS],
        "label": [True, False, False, True],
        "source": [path] * 4,
        "row": [1, 2, 3, 4],
    }


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "disk"])
def test_conversational_rows_stay_message_lists(write, fmt):
    rows = [dict(r) for r in CHAT_ROWS]
    # extra message keys are dropped: only role and content reach the chat template
    rows[1] = {**rows[1], "prompt": [{"role": "user", "content": "what is red", "name": "x"}]}
    ds = load_rows(write(rows, fmt))
    assert ds.features["prompt"] == datasets.List(
        {"role": datasets.Value("string"), "content": datasets.Value("string")})
    assert ds["prompt"][:] == [CHAT_ROWS[0]["prompt"], CHAT_ROWS[1]["prompt"]]
    assert ds["completion"][:] == [r["completion"] for r in CHAT_ROWS]
    assert ds["label"][:] == [True, False]


def test_folder_of_data_files_goes_to_load_dataset(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    path = write_rows(folder / "part", ROWS[:3], "jsonl")
    ds = load_rows(str(folder))
    assert ds["completion"][:] == [r["completion"] for r in ROWS[:3]]
    assert ds["source"][:] == [str(folder)] * 3 and path.startswith(str(folder))


def test_sources_concatenate_with_their_own_row_numbers(write):
    a = write(ROWS, "jsonl", name="a")
    b = write(ROWS[:2], "parquet", name="b")
    ds = load_rows([a, b])
    assert ds["source"][:] == [a] * 4 + [b] * 2
    assert ds["row"][:] == [1, 2, 3, 4, 1, 2]
    assert ds["completion"][:] == [r["completion"] for r in ROWS + ROWS[:2]]


def test_text_and_chat_sources_mix_as_json(write):
    a = write(ROWS[:1], "jsonl", name="a")
    b = write(CHAT_ROWS[:1], "jsonl", name="b")
    ds = load_rows([a, b])
    assert ds["prompt"][:] == [ROWS[0]["prompt"], CHAT_ROWS[0]["prompt"]]
    assert ds["completion"][:] == [ROWS[0]["completion"], CHAT_ROWS[0]["completion"]]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_label_accepts_bools_and_0_1(write, fmt):
    rows = [{**ROWS[0], "label": v} for v in (1, 0, 0, 1)]
    assert load_rows(write(rows, fmt))["label"][:] == [True, False, False, True]
    rows = [{**ROWS[0], "label": v} for v in (True, 0, False, 1)]  # mixed in one JSON lines file
    assert load_rows(write(rows, "jsonl", name="mixed"))["label"][:] == [True, False, False, True]


@pytest.mark.parametrize("bad, shown", [
    ("yes", '"yes"'), (2, "2"), (None, "null"), (0.5, "0.5"), (1.0, "1.0"),
    ([True], "[true]"),
])
def test_label_rejects_anything_else_naming_row_3(write, bad, shown):
    rows = [dict(r) for r in ROWS]
    rows[2]["label"] = bad
    path = write(rows)
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}: row 3: {LABEL_MSG}{shown}"


def test_label_digit_strings_rejected(write):
    """A column of "1"/"0" strings is text, not labels.

    (A lone "1" among JSON bools is not caught: datasets stores such a mixed column as JSON text
    and decodes that "1" as the number 1.)
    """
    rows = [{**r, "label": lab} for r, lab in zip(ROWS, ["1", "0", "0", "1"])]
    path = write(rows)
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f'{path}: row 1: {LABEL_MSG}"1"'


def test_label_strings_rejected_in_csv(write):
    rows = [{**r, "label": lab} for r, lab in zip(ROWS, ["yes", "no", "yes", "no"])]
    path = write(rows, "csv")
    with pytest.raises(DataError, match=r"row 1: field 'label': .* got \"yes\"$"):
        load_rows(path)


def test_missing_column_names_row_1_and_the_columns(write):
    path = write([{"prompt": r["prompt"], "completion": r["completion"]} for r in ROWS])
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}: row 1: field 'label' is missing (columns: prompt, completion)"


def test_missing_field_in_one_row(write):
    rows = [dict(r) for r in ROWS]
    del rows[1]["completion"]
    path = write(rows)
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}: row 2: field 'completion' is missing or empty"


def test_paired_data_gets_a_hint(write):
    path = write([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(DataError, match=r"row 1: field 'completion' is missing .*pairs_to_kto"):
        load_rows(path)


@pytest.mark.parametrize("rows, row, msg", [
    ([ROWS[0], {**ROWS[1], "completion": "  \n"}], 2, "field 'completion' is empty"),
    ([CHAT_ROWS[0], {**CHAT_ROWS[1], "completion": [{"role": "assistant", "content": " "}]}], 2,
     "field 'completion' is empty"),
    ([CHAT_ROWS[0], {**CHAT_ROWS[1], "completion": []}], 2, "field 'completion' is empty"),
    ([ROWS[0], ROWS[1], {**ROWS[2], "prompt": 5}], 3,
     "field 'prompt': expected a string or a list of {role, content} messages, got 5"),
    ([ROWS[0], {**ROWS[1], "completion": {"text": "hi"}}], 2,
     "field 'completion': expected a string or a list of {role, content} messages, "
     'got {"text": "hi"}'),
    ([CHAT_ROWS[0], {**CHAT_ROWS[1], "prompt": [{"role": "user"}]}], 2,
     "field 'prompt': message 1: expected {\"role\": str, \"content\": str}, got {\"role\": \"user\"}"),
    ([CHAT_ROWS[0], {**CHAT_ROWS[1], "prompt": [{"role": "user", "content": "hi"}, "hello"]}], 2,
     "field 'prompt': message 2: expected {\"role\": str, \"content\": str}, got \"hello\""),
    ([{**CHAT_ROWS[0], "completion": "yes"}], 1,
     "field 'completion': must be the same kind as 'prompt' (a list of messages)"),
])
def test_bad_rows_name_file_row_and_field(write, rows, row, msg):
    path = write(rows)
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}: row {row}: {msg}"


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}: file not found"
    with pytest.raises(DataError, match=r"^\./no/such/folder: file not found$"):
        load_rows("./no/such/folder")


def test_unknown_extension_and_unloadable_name(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("prompt completion label\n")
    with pytest.raises(DataError, match=r"rows\.txt: unsupported file type '\.txt'; expected "):
        load_rows(str(path))
    # not a local path: handed to datasets.load_dataset, which cannot reach the hub here
    with pytest.raises(DataError, match=r"^no_such_dataset_xyz: cannot be loaded \(.+\)$"):
        load_rows("no_such_dataset_xyz")


def test_broken_json_is_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b", "label": true}\n{"prompt": \n')
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert str(err.value).startswith(f"{path}: cannot be loaded (")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "disk"])
def test_no_rows(tmp_path, fmt):
    stem = tmp_path / "empty"
    if fmt == "jsonl":
        path = str(stem) + ".jsonl"
        open(path, "w").close()
    elif fmt == "json":
        path = str(stem) + ".json"
        with open(path, "w") as f:
            json.dump([], f)
    elif fmt == "csv":
        path = str(stem) + ".csv"
        with open(path, "w") as f:
            f.write("prompt,completion,label\n")
    else:
        empty = datasets.Dataset.from_dict({"prompt": [], "completion": [], "label": []})
        path = str(stem) + ".parquet" if fmt == "parquet" else str(stem)
        empty.to_parquet(path) if fmt == "parquet" else empty.save_to_disk(path)
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value).startswith(f"{path}: no rows")


def test_dataset_dict_without_train_split_lists_splits(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    path = str(tmp_path / "dd")
    datasets.DatasetDict({"validation": ds, "test": ds}).save_to_disk(path)
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}: saved DatasetDict has no 'train' split (splits: validation, test)"


def test_count_labels_follows_selection(write):
    ds = load_rows(write(ROWS))
    assert count_labels(ds) == (2, 2)
    assert count_labels(ds.select([0, 1, 3])) == (2, 1)  # works through an indices mapping


def test_one_class_is_refused_for_kto_only():
    with pytest.raises(DataError) as err:
        require_both_classes(120, 0, loss_type="kto", allow_single_class=False,
                             source="data/train.jsonl")
    assert str(err.value) == (
        "data/train.jsonl: all 120 rows are desirable (label true); KTO needs both classes "
        "(eq. 8 weighs one against the other); set kto.allow_single_class=true to train anyway")
    with pytest.raises(DataError, match=r"all 7 rows are undesirable \(label false\)"):
        require_both_classes(0, 7, loss_type="kto", allow_single_class=False, source="x")
    require_both_classes(120, 0, loss_type="kto", allow_single_class=True, source="x")
    require_both_classes(0, 7, loss_type="apo_zero_unpaired", allow_single_class=False, source="x")
    require_both_classes(3, 7, loss_type="kto", allow_single_class=False, source="x")


def test_100k_rows_load_fast_and_a_late_bad_row_is_found(tmp_path):
    """Row numbers must survive datasets' batching: the bad row is the very last of 100k."""
    n = 100_000
    path = tmp_path / "big.jsonl"
    line = '{"prompt": "the cat sat", "completion": "on the mat", "label": %s}\n'
    path.write_text("".join(line % ("true" if i % 3 else "false") for i in range(n - 1))
                    + line % '"yes"')
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert str(err.value) == f"{path}: row {n}: {LABEL_MSG}\"yes\""

    path.write_text("".join(line % ("true" if i % 3 else "false") for i in range(n)))
    start = time.perf_counter()
    ds = load_rows(str(path))
    elapsed = time.perf_counter() - start
    assert ds["row"][n - 1] == n
    assert count_labels(ds) == (n - (n + 2) // 3, (n + 2) // 3)  # i % 3 == 0 is false
    assert elapsed < 15, f"loading 100k rows took {elapsed:.1f}s"


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_weight_column_loads_as_float(write, fmt):
    rows = [{**r, "weight": w} for r, w in zip(ROWS, [1, 0.5, 0, 2.25])]
    ds = load_rows(write(rows, fmt))
    assert ds.column_names == ["prompt", "completion", "label", "source", "row", "weight"]
    assert ds.features["weight"] == datasets.Value("float64")
    assert ds["weight"][:] == [1.0, 0.5, 0.0, 2.25]


def test_a_source_without_weights_gives_weight_one_beside_a_weighted_one(write):
    weighted = write([{**ROWS[0], "weight": 0.25}], name="a")
    plain = write(ROWS[1:3], name="b")
    ds = load_rows([weighted, plain])
    assert ds["weight"][:] == [0.25, 1.0, 1.0]
    assert "weight" not in load_rows(plain).column_names  # unweighted data loads as before


@pytest.mark.parametrize("bad, shown", [(-0.5, "-0.5"), (float("nan"), "NaN"), (float("inf"), "Infinity"),
                                        (None, "null (a file with a weight column needs one in every row)")])
def test_a_bad_weight_is_one_line_naming_file_row_and_value(write, bad, shown):
    rows = [{**r, "weight": 1.0} for r in ROWS]
    rows[2]["weight"] = bad
    path = write(rows)
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}: row 3: field 'weight': expected a finite number >= 0, got {shown}"


@pytest.mark.parametrize("bad, shown", [("2", '"2"'), (True, "true")])
def test_a_weight_column_of_another_type_names_row_1(write, bad, shown):
    path = write([{**r, "weight": bad} for r in ROWS], "parquet")
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}: row 1: field 'weight': expected a finite number >= 0, got {shown}"
