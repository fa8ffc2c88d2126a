"""The real pretrained model: all-MiniLM-L6-v2 + LoRA(query, value) + head learns BANKING77's 77 intents on the
default (portable) engine. That the ort-training engine takes the same steps is tests/export/test_parity.py's
test_engines_match_pytorch_peft_minilm (both engines against PyTorch + PEFT, step by step), so its 100-second run of
this test is not repeated here."""

from __future__ import annotations

import pytest

from edgeft.config import ExportConfig, TrainConfig
from edgeft.data import DataConfig, load_dataset
from edgeft.train.engines import open_session
from edgeft.train.trainer import evaluate, train

pytestmark = pytest.mark.slow


def test_minilm_learns_banking77(export_once, banking_csv):
    from edgeft.datasets import banking77_labels

    LABELS = tuple(banking77_labels())

    from edgeft.demo import minilm_dir

    # the bundle test_parity's test_engines_match_pytorch_peft_minilm trains too: exported once a session (34 s)
    bundle = export_once(minilm_dir(), ExportConfig(labels=LABELS))
    assert bundle.manifest.engine == "portable"
    assert len(bundle.manifest.trainable) == 26  # 6 layers x (query, value) x (A, B) + classifier weight, bias
    train_data = load_dataset(DataConfig(banking_csv["train"], label_column="category"), bundle)
    test_data = load_dataset(DataConfig(banking_csv["test"], label_column="category"), bundle).subset(range(0, 3080, 4))
    result = train(bundle, train_data, TrainConfig(max_steps=200, learning_rate=5e-3, progress=False))
    session = open_session(bundle)
    session.set_parameters(result.parameters)
    metrics = evaluate(session, test_data, "classification", 0)
    assert metrics["accuracy"] > 0.5 and metrics["macro_f1"] > 0.4  # chance is 1.3%
