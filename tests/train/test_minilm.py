"""The real pretrained model: all-MiniLM-L6-v2 + LoRA(query, value) + head learns BANKING77's 77 intents, on
either engine."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edgeft.config import ExportConfig, TrainConfig
from edgeft.data import DataConfig, load_dataset
from edgeft.train.engines import open_session
from edgeft.train.trainer import evaluate, train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("engine", ["ort-training", "portable"])
def test_minilm_learns_banking77(engine, tmp_path, banking_csv):
    from edgeft.datasets import banking77_labels

    LABELS = tuple(banking77_labels())

    from edgeft.demo import minilm_dir
    from edgeft.export import export_hf

    bundle = export_hf(minilm_dir(), tmp_path / "bundle", replace(ExportConfig(labels=LABELS), engine=engine))
    assert bundle.manifest.engine == engine
    assert len(bundle.manifest.trainable) == 26  # 6 layers x (query, value) x (A, B) + classifier weight, bias
    train_data = load_dataset(DataConfig(banking_csv["train"], label_column="category"), bundle)
    test_data = load_dataset(DataConfig(banking_csv["test"], label_column="category"), bundle).subset(range(0, 3080, 4))
    result = train(bundle, train_data, TrainConfig(max_steps=200, learning_rate=5e-3, progress=False))
    session = open_session(bundle)
    session.set_parameters(result.parameters)
    metrics = evaluate(session, test_data, "classification", 0)
    assert metrics["accuracy"] > 0.5 and metrics["macro_f1"] > 0.4  # chance is 1.3%
