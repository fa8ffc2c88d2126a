"""Data: formats, column and label mapping, dynamic padding and length bucketing, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeft.data import DataConfig, Dataset, batches, load_dataset, split
from edgeft.errors import DataError


def test_csv_with_quoted_commas_and_label_ids(tiny_bundle, banking_csv):
    data = load_dataset(DataConfig(banking_csv["test"], label_column="category"), tiny_bundle)
    assert len(data) == 3080
    labels = tiny_bundle.manifest.labels
    assert labels[int(data.targets[0])] == "card_arrival"
    assert data.targets.dtype == np.int64 and set(np.unique(data.targets)) == set(range(77))
    assert max(len(x) for x in data.ids) <= tiny_bundle.manifest.tokenizer["max_length"]


def test_jsonl_and_label_map(tmp_path, tiny_bundle):
    path = tmp_path / "d.jsonl"
    rows = [{"utterance": "where is my card", "intent": "arrival"}, {"utterance": "top up failed", "intent": "topup"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    config = DataConfig(path, text_column="utterance", label_column="intent",
                        label_map={"arrival": "card_arrival", "topup": "top_up_failed"})
    data = load_dataset(config, tiny_bundle)
    labels = tiny_bundle.manifest.labels
    assert [labels[i] for i in data.targets] == ["card_arrival", "top_up_failed"]


def test_missing_column_is_named(tmp_path, tiny_bundle, banking_csv):
    with pytest.raises(DataError, match=r"no column 'label'.*columns: text, category"):
        load_dataset(DataConfig(banking_csv["test"]), tiny_bundle)


def test_unknown_label_is_named(tmp_path, tiny_bundle):
    path = tmp_path / "d.csv"
    path.write_text("text,category\nhello,card_arrival\nbye,pay_with_crypto\n")
    with pytest.raises(DataError, match=r"unknown label\(s\) \['pay_with_crypto'\]"):
        load_dataset(DataConfig(path, label_column="category"), tiny_bundle)


def test_missing_and_garbled_files(tmp_path, tiny_bundle):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataConfig(tmp_path / "none.csv"), tiny_bundle)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "card_arrival"}\n{not json\n')
    with pytest.raises(DataError, match="not valid jsonl"):
        load_dataset(DataConfig(bad), tiny_bundle)
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(DataConfig(binary), tiny_bundle)


def _dataset(lengths: list[int]) -> Dataset:
    return Dataset([np.arange(1, n + 1, dtype=np.int64) for n in lengths], np.arange(len(lengths)))


def test_dynamic_padding_and_mask():
    batch = next(batches(_dataset([3, 5, 2]), 3, pad_id=0))
    assert batch["input_ids"].shape == (3, 5)
    assert batch["attention_mask"].sum(axis=1).tolist() == [3, 5, 2]
    assert batch["input_ids"][2].tolist() == [1, 2, 0, 0, 0]


def test_length_bucketing_cuts_padding_and_keeps_every_example():
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 100, size=640).tolist()
    data = _dataset(lengths)

    def padding(shuffled_batches):
        cells = sum(b["input_ids"].size for b in shuffled_batches)
        return 1 - sum(lengths) / cells

    bucketed = list(batches(data, 32, 0, shuffle=True, seed=1, bucket_size=20))
    plain = list(batches(data, 32, 0, shuffle=True, seed=1, bucket_size=1))
    assert padding(bucketed) < 0.1 < padding(plain)
    assert sorted(np.concatenate([b["labels"] for b in bucketed]).tolist()) == list(range(640))


def test_causal_lm_text_is_cut_into_blocks_and_padding_is_ignored(tmp_path, shakespeare, tiny_lm_bundle):
    excerpt = tmp_path / "excerpt.txt"
    excerpt.write_text(shakespeare.read_text()[:5000])
    data = load_dataset(DataConfig(excerpt), tiny_lm_bundle)
    block = tiny_lm_bundle.manifest.tokenizer["max_length"]
    assert all(len(x) <= block for x in data.ids) and len(data) > 5
    batch = next(batches(data.subset([0, len(data) - 1]), 2, 0))
    assert np.all(batch["labels"][batch["attention_mask"] == 0] == -100)


def test_split_is_reproducible():
    train_a, val_a = split(_dataset([3] * 100), 0.2, seed=3)
    train_b, val_b = split(_dataset([3] * 100), 0.2, seed=3)
    assert len(val_a) == 20 and val_a.targets.tolist() == val_b.targets.tolist()
    assert not set(train_a.targets.tolist()) & set(val_a.targets.tolist())
