"""The data layer of `swarm tune`: loading local files, saved datasets and hub datasets, splitting, batching."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swarm.core.demo import build_demo_tokenizer
from swarm.core.tune import (
    Example,
    batches,
    collate,
    count_batches,
    lm_chunks,
    load_data,
    pad_token_id,
    prepare,
)
from swarm.transport.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level: token id == byte value, <s> (256) prepended, <pad> is 258."""
    return build_demo_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_delimited(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def sentiment_rows(n: int = 10) -> list[dict]:
    return [{"text": f"review {i}", "label": ["pos", "neg"][i % 2]} for i in range(n)]


def all_examples(data) -> list[Example]:
    return data.train + data.validation


# ------------------------------------------------------------------------------------------------------ local files


def test_jsonl_string_labels_are_sorted_names(tmp_path):
    data = load_data(str(write_jsonl(tmp_path / "d.jsonl", sentiment_rows(10))))
    assert data.labels == ["neg", "pos"]
    assert data.num_labels == 2
    assert (len(data.train), len(data.validation)) == (9, 1)
    for example in all_examples(data):
        assert example.label == (0 if int(example.text.split()[1]) % 2 else 1)
    assert sorted(e.text for e in all_examples(data)) == sorted(f"review {i}" for i in range(10))


def test_jsonl_int_labels_name_every_id_up_to_the_largest(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 3 * 2} for i in range(6)]  # labels 0, 2, 4
    data = load_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), validation_split=0)
    assert data.labels == ["0", "1", "2", "3", "4"]
    assert data.validation == []
    assert sorted(e.label for e in data.train) == [0, 0, 2, 2, 4, 4]


def test_json_array_and_json_lines_in_a_json_file(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps(sentiment_rows(4), indent=2), encoding="utf-8")
    lines = write_jsonl(tmp_path / "l.json", sentiment_rows(4))
    for path in (array, lines):
        data = load_data(str(path), validation_split=0)
        assert sorted((e.text, e.label) for e in data.train) == [("review 0", 1), ("review 1", 0), ("review 2", 1),
                                                                 ("review 3", 0)]


def test_csv_integer_literals_become_int_labels(tmp_path):
    path = write_delimited(tmp_path / "d.csv", ["label", "text"], [["1", "good, really"], ["0", "bad"], ["2", "meh"]])
    data = load_data(str(path), validation_split=0)
    assert data.labels == ["0", "1", "2"]
    assert sorted((e.text, e.label) for e in data.train) == [("bad", 0), ("good, really", 1), ("meh", 2)]


def test_tsv_string_labels_and_field_overrides(tmp_path):
    path = write_delimited(tmp_path / "d.tsv", ["review", "stars"], [["a\tb", "five"], ["c", "one"], ["d", "1"]],
                           delimiter="\t")
    data = load_data(str(path), text_field="review", label_field="stars", validation_split=0)
    assert data.labels == ["1", "five", "one"]  # "1" is a string here: not every label is an integer literal
    assert sorted((e.text, e.label) for e in data.train) == [("a\tb", 1), ("c", 2), ("d", 0)]


def test_sentence_is_the_text_field_when_there_is_no_text(tmp_path):
    rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(4)]
    data = load_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), validation_split=0)
    assert sorted(e.text for e in data.train) == ["s0", "s1", "s2", "s3"]


def test_split_is_deterministic_per_seed(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", sentiment_rows(40)))
    first = load_data(path, validation_split=0.25, seed=1)
    again = load_data(path, validation_split=0.25, seed=1)
    other = load_data(path, validation_split=0.25, seed=2)
    assert (len(first.train), len(first.validation)) == (30, 10)
    assert first == again
    assert {e.text for e in first.validation} != {e.text for e in other.validation}
    assert {e.text for e in all_examples(first)} == {e.text for e in all_examples(other)}


def test_validation_split_bounds_and_tiny_files(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", sentiment_rows(2)))
    data = load_data(path, validation_split=0.01)  # at least one example is held out
    assert (len(data.train), len(data.validation)) == (1, 1)
    for bad in (-0.1, 0.6):
        with pytest.raises(ConfigError, match="validation_split must be between 0 and 0.5"):
            load_data(path, validation_split=bad)


def test_validation_file_replaces_the_split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(6))
    val = write_delimited(tmp_path / "val.csv", ["text", "label"], [["v1", "pos"], ["v2", "neu"]])
    data = load_data(str(train), validation_file=str(val))
    assert len(data.train) == 6
    assert data.labels == ["neg", "neu", "pos"]  # names come from both files
    assert [(e.text, e.label) for e in data.validation] == [("v1", 2), ("v2", 1)]


def test_max_examples_caps_the_shuffled_train_part(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", sentiment_rows(20)))
    full = load_data(path, seed=3)
    capped = load_data(path, seed=3, max_examples=5)
    assert capped.train == full.train[:5]
    assert capped.validation == full.validation
    assert capped.labels == full.labels


def test_lm_task_ignores_labels_and_skips_empty_texts(tmp_path):
    rows = [{"text": "one"}, {"text": ""}, {"text": "  "}, {"text": "two", "label": 3.5}, {"text": "three"}]
    data = load_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), task="lm", validation_split=0)
    assert data.labels is None and data.num_labels == 0
    assert sorted(e.text for e in data.train) == ["one", "three", "two"]
    assert all(e.label is None for e in data.train)


# ------------------------------------------------------------------------------------------------------ local errors


def jsonl_error(tmp_path, lines: list[str], match: str, **kwargs) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        load_data(str(path), **kwargs)


def test_unknown_task(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'regression'"):
        load_data(str(write_jsonl(tmp_path / "d.jsonl", sentiment_rows())), task="regression")


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset file not found: .*nope\.jsonl"):
        load_data(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match=r"dataset file not found: .*missing\.csv"):
        load_data(str(write_jsonl(tmp_path / "d.jsonl", sentiment_rows())),
                  validation_file=str(tmp_path / "missing.csv"))
    text = tmp_path / "d.txt"
    text.write_text("hello\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"d\.txt: unsupported file type '\.txt'; supported are \.jsonl, \.json"):
        load_data(str(text))


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.jsonl", "\n \n"), ("e.csv", ""),
                                           ("e.csv", "text,label\n"), ("e.json", "[]")])
def test_empty_files(tmp_path, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{name} has no examples"):
        load_data(str(tmp_path / name))


def test_invalid_json_names_the_line(tmp_path):
    jsonl_error(tmp_path, ['{"text": "a", "label": 1}', '{"text": "b", "label": 0', ""],
                r"bad\.jsonl line 2: invalid JSON")
    jsonl_error(tmp_path, ['{"text": "a", "label": 1}', '["b", 0]'], r"bad\.jsonl line 2: expected a JSON object")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"text": "a", "label": 1},\n{"text": }\n]', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.json line 3: invalid JSON"):
        load_data(str(broken))


def test_missing_fields_list_what_the_row_has(tmp_path):
    jsonl_error(tmp_path, ['{"text": "a", "label": 1}', '{"body": "b", "label": 0}'],
                r"bad\.jsonl line 2: no text field 'text' \(the row has: 'body', 'label'\)")
    jsonl_error(tmp_path, ['{"text": "a", "label": 1}', '{"text": "b", "stars": 0}'],
                r"bad\.jsonl line 2: no label field 'label' \(the row has: 'text', 'stars'\)")
    jsonl_error(tmp_path, ['{"text": "a", "label": 1}'], r"line 1: no text field 'body'", text_field="body")
    jsonl_error(tmp_path, ['{"text": "a", "label": 1}'], r"line 1: no label field 'y'", label_field="y")


def test_bad_text(tmp_path):
    jsonl_error(tmp_path, ['{"text": "a", "label": 1}', '{"text": 7, "label": 0}'],
                r"bad\.jsonl line 2: text field 'text' must be a string, got an integer")
    jsonl_error(tmp_path, ['{"text": "a", "label": 1}', '{"text": null, "label": 0}'],
                r"line 2: text field 'text' must be a string, got null")
    jsonl_error(tmp_path, ['{"text": "a", "label": 1}', '{"text": " ", "label": 0}'],
                r"bad\.jsonl line 2: text field 'text' is empty")


@pytest.mark.parametrize("label, kind", [("1.5", "a number"), ("true", "a boolean"), ("null", "null"),
                                         ("[1]", "a list"), ('{"a": 1}', "an object")])
def test_labels_of_a_wrong_type(tmp_path, label, kind):
    jsonl_error(tmp_path, ['{"text": "a", "label": 1}', f'{{"text": "b", "label": {label}}}'],
                rf"bad\.jsonl line 2: label field 'label' must be an integer or a string, got {kind}")


def test_bad_label_values(tmp_path):
    jsonl_error(tmp_path, ['{"text": "a", "label": 1}', '{"text": "b", "label": -2}'],
                r"bad\.jsonl line 2: label -2 is negative")
    jsonl_error(tmp_path, ['{"text": "a", "label": "x"}', '{"text": "b", "label": ""}'],
                r"bad\.jsonl line 2: label field 'label' is empty")
    jsonl_error(tmp_path, ['{"text": "a", "label": 1}', '{"text": "b", "label": "pos"}'],
                r"bad\.jsonl: labels mix integers and strings \(.*line 1 has 1, .*line 2 has 'pos'\)")
    jsonl_error(tmp_path, ['{"text": "a", "label": "pos"}', '{"text": "b", "label": "pos"}'],
                r"bad\.jsonl: classification needs at least 2 distinct labels, found 1 \('pos'\)")


def test_csv_row_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nfine,1\nno, quotes, here,0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.csv line 3: 4 fields, but the header has 2 \(text, label\)"):
        load_data(str(path))
    path.write_text("body,label\nfine,1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.csv line 2: no text field 'text' \(the row has: 'body', 'label'\)"):
        load_data(str(path))
    path.write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(ConfigError, match=r"bad\.csv is not UTF-8 text"):
        load_data(str(path))


def test_a_plain_directory_is_not_a_dataset(tmp_path):
    with pytest.raises(ConfigError, match="is a directory but not a dataset saved with save_to_disk"):
        load_data(str(tmp_path))
    with pytest.raises(ConfigError, match="validation_file works with a local dataset file"):
        load_data(str(tmp_path), validation_file=str(tmp_path / "v.jsonl"))


# -------------------------------------------------------------------------------------------------- datasets library


def test_saved_dataset_is_split_like_a_file(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"sentence": [f"s{i}" for i in range(10)], "label": [i % 2 for i in range(10)]}) \
        .save_to_disk(str(tmp_path / "ds"))
    data = load_data(str(tmp_path / "ds"), validation_split=0.2, seed=0)
    assert (len(data.train), len(data.validation)) == (8, 2)
    assert data.labels == ["0", "1"]
    assert sorted(e.text for e in all_examples(data)) == sorted(f"s{i}" for i in range(10))


def test_saved_dataset_dict_uses_its_splits_and_class_names(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b", "", "c"], "label": [0, 1, 1, 0]}, features=features),
        "test": datasets.Dataset.from_dict({"text": ["x", "y"], "label": [-1, -1]},
                                           features=datasets.Features({"text": datasets.Value("string"),
                                                                       "label": datasets.Value("int64")})),
        "validation": datasets.Dataset.from_dict({"text": ["v", "w"], "label": [1, 0]}, features=features),
    })
    splits.save_to_disk(str(tmp_path / "dd"))
    data = load_data(str(tmp_path / "dd"))
    assert data.labels == ["negative", "positive"]
    assert sorted((e.text, e.label) for e in data.train) == [("a", 0), ("b", 1), ("c", 0)]  # empty text dropped
    assert [(e.text, e.label) for e in data.validation] == [("v", 1), ("w", 0)]
    lm = load_data(str(tmp_path / "dd"), task="lm")
    assert sorted(e.text for e in lm.train) == ["a", "b", "c"]


def fake_hub(monkeypatch, splits: dict) -> list:
    """Make datasets.load_dataset return `splits` (a DatasetDict) and record what it was asked for."""
    import datasets

    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return datasets.DatasetDict(splits)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_aliases_pick_path_config_fields_and_splits(monkeypatch):
    import datasets

    glue = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"]),
                              "idx": datasets.Value("int32")})
    rows = {"sentence": ["s0", "s1", "s2"], "label": [0, 1, 0], "idx": [0, 1, 2]}
    calls = fake_hub(monkeypatch, {
        "train": datasets.Dataset.from_dict(rows, features=glue),
        "validation": datasets.Dataset.from_dict({**rows, "label": [1, 0, 1]}, features=glue),
        "test": datasets.Dataset.from_dict({**rows, "label": [-1, -1, -1]}, features=glue),
    })
    data = load_data("SST2", max_examples=2)
    assert calls == [("nyu-mll/glue", "sst2")]
    assert data.labels == ["neg", "pos"]
    assert len(data.train) == 2
    assert [(e.text, e.label) for e in data.validation] == [("s0", 1), ("s1", 0), ("s2", 1)]


def test_hub_test_split_serves_as_validation_unless_unlabelled(monkeypatch):
    import datasets

    train = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(10)], "label": [i % 2 for i in range(10)]})
    calls = fake_hub(monkeypatch, {"train": train,
                                   "test": datasets.Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]})})
    data = load_data("someone/reviews:plain")
    assert calls == [("someone/reviews", "plain")]
    assert [e.text for e in data.validation] == ["x", "y"]

    fake_hub(monkeypatch, {"train": train, "test": datasets.Dataset.from_dict({"text": ["x"], "label": [-1]})})
    data = load_data("someone/reviews", validation_split=0.2)
    assert (len(data.train), len(data.validation)) == (8, 2)
    assert all(e.text.startswith("t") for e in data.validation)


def test_wikitext_alias_is_for_lm(monkeypatch):
    import datasets

    calls = fake_hub(monkeypatch, {
        "train": datasets.Dataset.from_dict({"text": ["", " = Title = \n", "", "Some words .\n"]}),
        "validation": datasets.Dataset.from_dict({"text": ["", "More .\n"]}),
    })
    data = load_data("wikitext2", task="lm")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1")]
    assert sorted(e.text for e in data.train) == [" = Title = \n", "Some words .\n"]
    assert [e.text for e in data.validation] == ["More .\n"]
    with pytest.raises(ConfigError, match="'wikitext2' has no labels; use it with the lm task"):
        load_data("wikitext2")


def test_hub_failures_become_one_config_error(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def failing(error):
        def load_dataset(*args, **kwargs):
            raise error
        return load_dataset

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", failing(ConnectionError("Couldn't reach 'x' on the Hub")))
    with pytest.raises(ConfigError, match=r"dataset 'imdb' is not in the local datasets cache and the Hugging Face "
                                          r"hub cannot be reached \(Couldn't reach 'x' on the Hub\).*--dataset "
                                          r"\./data\.jsonl") as info:
        load_data("imdb")
    assert isinstance(info.value.__cause__, ConnectionError)
    monkeypatch.setattr(datasets, "load_dataset", failing(DatasetNotFoundError("Dataset 'a/b' doesn't exist")))
    with pytest.raises(ConfigError, match=r"dataset 'a/b' was not found on the Hugging Face hub"):
        load_data("a/b")
    monkeypatch.setattr(datasets, "load_dataset", failing(ValueError("Config name is missing.\nPick one of: x, y")))
    with pytest.raises(ConfigError, match=r"cannot load dataset 'a/b' \(Config name is missing\.\); pass a local"):
        load_data("a/b")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", failing(DatasetNotFoundError("Dataset 'a/b' doesn't exist")))
    with pytest.raises(ConfigError, match=r"not in the local datasets cache .*\(offline mode is on"):
        load_data("a/b")


def test_uncached_hub_dataset_offline_gives_a_clear_error(tmp_path):
    """The real datasets library, offline, with an empty cache (a subprocess: datasets reads its env at import)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"), "PATH": "/usr/bin:/bin"}
    code = ("from swarm.core.tune import load_data\n"
            "from swarm.transport.errors import ConfigError\n"
            "try:\n    load_data('sst2')\nexcept ConfigError as exc:\n    print('ConfigError:', exc)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "ConfigError: dataset 'sst2' is not in the local datasets cache" in result.stdout
    assert "--dataset ./data.jsonl" in result.stdout
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------------- batching


def test_classification_batches_pad_right_and_mask(tokenizer):
    examples = [Example("ab", 1), Example("abcd", 0), Example("a", 2)]
    items = prepare(examples, tokenizer, max_length=16, task="classification")
    assert items == [([256, 97, 98], 1), ([256, 97, 98, 99, 100], 0), ([256, 97], 2)]
    pad = pad_token_id(tokenizer)
    assert pad == tokenizer.pad_token_id == 258
    (first, second) = list(batches(items, 2, pad_id=pad, task="classification"))
    assert first.input_ids.tolist() == [[256, 97, 98, pad, pad], [256, 97, 98, 99, 100]]
    assert first.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert first.labels.tolist() == [1, 0]
    assert second.input_ids.tolist() == [[256, 97]] and second.labels.tolist() == [2]
    for tensor in (first.input_ids, first.attention_mask, first.labels):
        assert tensor.dtype == torch.long
    assert count_batches(len(items), 2) == 2 and count_batches(0, 2) == 0 and count_batches(4, 2) == 2


def test_classification_truncates_and_warns_once(tokenizer, caplog):
    examples = [Example("abcdefgh", 0), Example("xyz", 1), Example("0123456789", 1)]
    with caplog.at_level(logging.WARNING, logger="swarm.core.tune.data"):
        items = prepare(examples, tokenizer, max_length=4, task="classification")
    assert items == [([256, 97, 98, 99], 0), ([256, 120, 121, 122], 1), ([256, 48, 49, 50], 1)]
    warnings = [r.getMessage() for r in caplog.records if r.name == "swarm.core.tune.data"]
    assert warnings == ["2 of 3 examples were longer than 4 tokens and were truncated to their first 4"]


def test_lm_chunks_cover_the_tokens(tokenizer):
    text = "the quick brown fox jumps"
    tokens = tokenizer(text, add_special_tokens=True)["input_ids"]
    chunks = lm_chunks([Example(text, None), Example("hi", None)], tokenizer, max_length=8)
    assert [len(c) for c in chunks] == [8, 8, 8, 2, 3]
    assert sum(chunks[:4], []) == tokens
    assert chunks[4] == [256, 104, 105]


def test_lm_batches_label_padding_with_minus_100(tokenizer):
    items = prepare([Example("abcdefghij", None), Example("xy", None)], tokenizer, max_length=6, task="lm")
    assert [ids for ids, _ in items] == [[256, 97, 98, 99, 100, 101], [102, 103, 104, 105, 106], [256, 120, 121]]
    assert all(label is None for _, label in items)
    (batch,) = list(batches(items, 3, pad_id=0, task="lm"))
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.labels.shape == (3, 6)
    assert batch.input_ids[2].tolist() == [256, 120, 121, 0, 0, 0]
    assert batch.labels[2].tolist() == [256, 120, 121, -100, -100, -100]
    assert batch.labels[1].tolist() == [102, 103, 104, 105, 106, -100]
    assert torch.equal(batch.labels[0], batch.input_ids[0])


def test_shuffle_is_deterministic_per_seed_and_epoch():
    items = [([i + 1], i % 2) for i in range(40)]

    def order(**kwargs):
        return [row[0] for b in batches(items, 7, pad_id=0, task="classification", **kwargs)
                for row in b.input_ids.tolist()]

    assert order() == list(range(1, 41))
    assert order(shuffle=True, seed=5, epoch=1) == order(shuffle=True, seed=5, epoch=1)
    assert order(shuffle=True, seed=5, epoch=1) != order(shuffle=True, seed=5, epoch=2)
    assert order(shuffle=True, seed=5, epoch=0) != order(shuffle=True, seed=6, epoch=0)
    assert sorted(order(shuffle=True, seed=5, epoch=3)) == list(range(1, 41))


def test_pad_id_falls_back_to_eos_then_zero():
    class Tok:
        pad_token_id = None
        eos_token_id = 7

    assert pad_token_id(Tok()) == 7
    Tok.eos_token_id = None
    assert pad_token_id(Tok()) == 0


def test_batching_arguments_are_checked(tokenizer):
    with pytest.raises(ConfigError, match="max_length must be at least 1"):
        prepare([Example("a", 0)], tokenizer, max_length=0, task="classification")
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        list(batches([([1], 0)], 0, pad_id=0, task="classification"))
    with pytest.raises(ConfigError, match="has no label"):
        prepare([Example("a", None)], tokenizer, max_length=4, task="classification")
    batch = collate([([1, 2], 1), ([3], 0)], pad_id=9, task="classification").to("cpu")
    assert batch.input_ids.tolist() == [[1, 2], [3, 9]]
