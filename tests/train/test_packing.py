"""Packing short causal-LM examples into full rows (``edgeft.data.pack``, ``TrainConfig.pack``): each packed example
attends only to itself and its positions restart, so its logits and its loss are those it has in a row of its own."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edgeft.bundle import Bundle
from edgeft.config import AdapterConfig, ExportConfig, TrainConfig
from edgeft.data import IGNORE_INDEX, Dataset, DataConfig, batches, load_dataset, pack
from edgeft.errors import ConfigError
from edgeft.export import export_hf
from edgeft.train.engines import open_session
from edgeft.train.trainer import train


def examples(lengths: list[int], vocab: int = 300, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, vocab, size=n).astype(np.int64) for n in lengths]
    labels = [np.where(np.arange(n) < n // 2, IGNORE_INDEX, x) for n, x in zip(lengths, ids)]  # a masked prompt half
    return Dataset(ids, None, labels)


def test_pack_fills_rows_best_fit_and_unlabels_each_examples_first_token():
    data = examples([7, 3, 9, 2, 5, 4])
    packed = pack(data, max_length=10)
    assert sorted(len(r) for r in packed.ids) == [2, 9, 9, 10]  # 9 | 7+3 | 5+4 | 2: best fit, none split
    assert sum(len(r) for r in packed.ids) == data.n_tokens and packed.notes["packed_rows"] == 4
    for ids, labels, segments in zip(packed.ids, packed.labels, packed.segments):
        starts = np.flatnonzero(np.diff(segments, prepend=0))
        assert list(segments[starts]) == list(range(1, len(starts) + 1))
        assert (labels[starts] == IGNORE_INDEX).all()
        for start, end in zip(starts, [*starts[1:], len(ids)]):  # each segment is one example, labels and all
            match = [i for i, x in enumerate(data.ids) if len(x) == end - start and (x == ids[start:end]).all()]
            assert len(match) == 1
            assert (labels[start + 1:end] == data.labels[match[0]][1:]).all()
    batch = packed.collate(np.arange(4), pad_id=0)
    assert batch["attention_mask"].max() == 2 and (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    with pytest.raises(ConfigError, match="only once"):
        pack(packed, 10)


def test_pack_is_fast_on_many_examples():
    data = examples(list(np.random.default_rng(1).integers(2, 60, size=20_000)))
    packed = pack(data, max_length=256)
    assert sum(len(r) for r in packed.ids) == data.n_tokens
    assert np.mean([len(r) for r in packed.ids]) > 250  # nearly full rows


def packed_equals_separate(bundle: Bundle) -> None:
    data = examples([12, 5, 20, 9, 3], vocab=300)
    session = open_session(bundle)
    alone_loss, alone_logits = session.eval_step(next(batches(data, 8, pad_id=0)))
    packed = pack(data, max_length=64)
    assert len(packed) == 1
    loss, logits = session.eval_step(next(batches(packed, 8, pad_id=0)))
    np.testing.assert_allclose(loss, alone_loss, rtol=1e-5)  # the same labelled tokens, the same predictions
    segments = packed.segments[0]
    for k in range(1, len(data) + 1):
        where = np.flatnonzero(segments == k)
        index = next(i for i, x in enumerate(data.ids) if len(x) == len(where) and (x == packed.ids[0][where]).all())
        np.testing.assert_allclose(logits[0, where], alone_logits[index, : len(where)], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bundle", ["tiny_lm_bundle", pytest.param("tiny_lm_portable_bundle", marks=pytest.mark.slow)])
def test_a_packed_gpt2_row_gives_each_example_its_own_logits(bundle, request):
    packed_equals_separate(request.getfixturevalue(bundle))


def test_a_packed_llama_row_gives_each_example_its_own_logits(tmp_path, tiny_llama_dir):
    """Rotary positions restart in each example, and grouped-query attention stays inside it."""
    packed_equals_separate(export_hf(tiny_llama_dir, tmp_path / "bundle", ExportConfig(
        task="causal-lm", max_length=64, adapter=AdapterConfig(rank=4), engine="ort-training")))


def test_training_with_pack_runs_on_fewer_rows_and_counts_examples(tmp_path, tiny_lm_bundle, shakespeare):
    lines = [line for line in shakespeare.read_text()[:20_000].splitlines() if line.strip()][:120]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": a + "\n", "completion": b}) + "\n" for a, b in zip(lines, lines[1:])))
    data = load_dataset(DataConfig(path), tiny_lm_bundle)
    result = train(tiny_lm_bundle, data, TrainConfig(epochs=1, batch_size=4, pack=True, progress=False))
    assert result.n_examples == len(data)  # FedAvg weighs by examples, not rows
    assert result.steps == -(-len(pack(data, 64)) // 4) < -(-len(data) // 4)


def test_pack_refuses_bundles_that_cannot_pack(tmp_path, tiny_lm_bundle, tiny_bundle):
    data = examples([5, 6])
    old = Bundle(tiny_lm_bundle.path, dataclasses.replace(tiny_lm_bundle.manifest, packing=False))  # from before packing
    for bundle, message in ((old, "exported before"), (tiny_bundle, "causal-LM training examples")):
        with pytest.raises(ConfigError, match=message):
            train(bundle, data, TrainConfig(pack=True, progress=False))
