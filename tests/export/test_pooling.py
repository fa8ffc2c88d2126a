"""Task heads on the model's own sentence pooling (sentence-transformers folders): what the export builds,
the features output of its graphs against PyTorch, and the plain [CLS] head still on request."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from edgeft.errors import ExportError, TrainingError
from edgeft.export import export_hf
from edgeft.export.source import SentenceClassifier, from_hf_folder, pool, sentence_pooling
from edgeft.export.toy import tiny_bert
from edgeft.train.engines import open_session

SENTENCE_BUNDLES = ["tiny_sentence_bundle", pytest.param("tiny_sentence_portable_bundle", marks=pytest.mark.slow)]
IDS = np.array([[101, 2129, 2079, 1045, 102], [101, 4067, 102, 0, 0]])
BATCH = {"input_ids": IDS, "attention_mask": (IDS > 0).astype(np.int64), "labels": np.array([0, 1])}


def test_sentence_pooling_is_read_from_the_folder(tiny_sentence_dir, tiny_bert_dir):
    assert sentence_pooling(tiny_sentence_dir) == {"mode": "mean", "normalize": True, "dimension": 32}
    assert sentence_pooling(tiny_bert_dir) is None


def test_minilm_declares_mean_pooling_and_normalisation():
    from edgeft.demo import minilm_dir

    assert sentence_pooling(minilm_dir()) == {"mode": "mean", "normalize": True, "dimension": 384}


def test_pooling_modes_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 4.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 6.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    np.testing.assert_allclose(pool(hidden, mask, "mean_sqrt_len").numpy(), [[4 / np.sqrt(2), 8 / np.sqrt(2)]])


@pytest.mark.parametrize("bundle", SENTENCE_BUNDLES)
def test_export_uses_the_sentence_pooling_by_default(bundle, request, tiny_sentence_dir, tiny_config):
    tiny_sentence_bundle = request.getfixturevalue(bundle)
    manifest = tiny_sentence_bundle.manifest
    assert manifest.pooling == {"mode": "mean", "normalize": True, "dimension": 32}
    assert [o.name for o in manifest.outputs] == ["loss", "logits", "features"]
    weight, bias = manifest.head()
    assert "classifier" in weight and bias.endswith("bias")

    session = open_session(tiny_sentence_bundle, threads=1)
    features = session.features(BATCH)
    _, logits = session.eval_step(BATCH)
    model = from_hf_folder(tiny_sentence_dir, tiny_config).model
    assert isinstance(model, SentenceClassifier)
    with torch.no_grad():  # same weights: the export seeds the new head the same way every time
        expected_logits, expected = model(torch.tensor(IDS), torch.tensor(BATCH["attention_mask"]))
    np.testing.assert_allclose(features, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(logits, expected_logits.numpy(), atol=1e-5)


@pytest.mark.parametrize("bundle", SENTENCE_BUNDLES)
def test_padding_does_not_change_the_features(bundle, request):
    session = open_session(request.getfixturevalue(bundle), threads=1)
    alone = session.features({"input_ids": IDS[1:, :3], "attention_mask": np.ones((1, 3), np.int64),
                              "labels": np.array([1])})
    np.testing.assert_allclose(session.features(BATCH)[1], alone[0], atol=1e-5)


@pytest.mark.parametrize("engine", ["ort-training", pytest.param("portable", marks=pytest.mark.slow)])
def test_cls_pooling_keeps_the_hugging_face_head(engine, export_once, tiny_sentence_dir, tiny_config):
    bundle = export_once(tiny_sentence_dir, replace(tiny_config, pooling="cls", engine=engine))
    assert bundle.manifest.pooling is None
    assert [o.name for o in bundle.manifest.outputs] == ["loss", "logits"]
    with pytest.raises(TrainingError, match="no 'features' output"):
        open_session(bundle, threads=1).features(BATCH)


def test_sentence_pooling_needs_a_sentence_transformers_folder(tmp_path, tiny_bert_dir, tiny_config):
    with pytest.raises(ExportError, match="modules.json"):
        export_hf(tiny_bert_dir, tmp_path / "b", replace(tiny_config, pooling="sentence"))


def test_two_pooling_modes_at_once_are_refused(tmp_path):
    from edgeft.demo import minilm_dir

    folder = tiny_bert(tmp_path / "m", minilm_dir() / "tokenizer.json", num_labels=2, sentence_pooling="mean")
    config = folder / "1_Pooling" / "config.json"
    config.write_text(config.read_text().replace('"pooling_mode_max_tokens": false', '"pooling_mode_max_tokens": true'))
    with pytest.raises(ExportError, match="exactly one"):
        sentence_pooling(folder)
