"""Fixtures shared by the deployment tests: an adapter trained briefly on the tiny BERT bundle."""

from __future__ import annotations

import pytest

from edgeft.config import TrainConfig
from edgeft.data import DataConfig, load_dataset
from edgeft.train.trainer import train
from edgeft.update import AdapterUpdate, save_update


@pytest.fixture(scope="session")
def adapter(tmp_path_factory, tiny_bundle, small_banking):
    """update.safetensors of 15 steps of training on every 20th BANKING77 training row."""
    data = load_dataset(DataConfig(small_banking["train"], label_column="category"), tiny_bundle)
    result = train(tiny_bundle, data, TrainConfig(max_steps=15, learning_rate=3e-2, progress=False))
    path = tmp_path_factory.mktemp("adapter") / "update.safetensors"
    save_update(path, AdapterUpdate(result.parameters, result.n_examples, {}, tiny_bundle.digest))
    return path
