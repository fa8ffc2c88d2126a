"""Head-only training on cached features (edgeft.train.cached): the frozen backbone's features are computed once
and the head bundle trains on them, with the parameters and history the full forward pass gives, on both engines;
examples that change between epochs (augmented images) train on the full graph."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import edgeft.datasets
from edgeft.config import AdapterConfig, ExportConfig, TrainConfig
from edgeft.data import DataConfig, load_dataset, split
from edgeft.export import export_module
from edgeft.images import ImagePreprocessing
from edgeft.train import cached
from edgeft.train.engines import open_session
from edgeft.train.trainer import train
from small_models import SmallCNN

DIGITS = Path(edgeft.datasets.__file__).parent / "digits" / "train"
LABELS = tuple(str(i) for i in range(10))
SPEC = ImagePreprocessing(size=16, resize=16, channels="L", mean=(0.5,), std=(0.5,), augment=False)


def cnn_bundle(tmp_path: Path, engine: str, spec: ImagePreprocessing = SPEC, proximal_mu: float = 0.0):
    torch.manual_seed(0)
    config = ExportConfig(task="classification", labels=LABELS, engine=engine, proximal_mu=proximal_mu,
                          adapter=AdapterConfig(kind="head", trainable_modules=("fc",)))
    return export_module(SmallCNN(), {"pixel_values": torch.zeros(2, 1, 16, 16)}, tmp_path / f"cnn-{engine}",
                         config, preprocessing=spec)


@pytest.mark.parametrize("engine", ["portable", "ort-training"])
def test_cached_features_train_as_the_full_forward_pass(tmp_path, engine):
    bundle = cnn_bundle(tmp_path, engine)
    assert bundle.manifest.pooling["head_bundle"] == "head" and "head/manifest.json" in bundle.manifest.files
    data, val = split(load_dataset(DataConfig(DIGITS), bundle), 0.2, seed=0)
    data = data.subset(np.arange(200))
    config = TrainConfig(epochs=3, batch_size=16, learning_rate=1e-2, progress=False)
    results = {}
    for cache in (True, False):
        session = open_session(bundle)
        plan = cached.cached_head(bundle, session, data, val, dataclasses.replace(config, cache_features=cache))
        assert (plan is not None) == cache
        results[cache] = train(bundle, data, dataclasses.replace(config, cache_features=cache), val, session=session)
        results[cache].session = session
    fast, full = results[True], results[False]
    assert fast.steps == full.steps == 39 and fast.n_examples == full.n_examples == 200
    for name, value in full.parameters.items():
        np.testing.assert_allclose(fast.parameters[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    for a, b in zip(fast.history, full.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1e-9)
    assert fast.history[-1]["train_loss"] < fast.history[0]["train_loss"]
    # the caller's session ends with the trained head, as after the full pass
    for name, value in fast.session.get_parameters().items():
        np.testing.assert_array_equal(value, fast.parameters[name])


def test_fedprox_head_bundle_keeps_the_anchor(tmp_path):
    bundle = cnn_bundle(tmp_path, "portable", proximal_mu=0.5)
    data = load_dataset(DataConfig(DIGITS), bundle).subset(np.arange(96))
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=5e-2, progress=False)
    start = {n: v + 0.1 for n, v in open_session(bundle).get_parameters().items()}  # a round's global adapter
    results = []
    for cache in (True, False):
        session = open_session(bundle)
        session.set_parameters(start)
        results.append(train(bundle, data, dataclasses.replace(config, cache_features=cache), session=session))
    for name, value in results[1].parameters.items():
        np.testing.assert_allclose(results[0].parameters[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_augmented_images_and_lora_bundles_use_the_full_graph(tmp_path):
    augmented = cnn_bundle(tmp_path, "portable", spec=dataclasses.replace(SPEC, augment=True))
    data = load_dataset(DataConfig(DIGITS), augmented).subset(np.arange(32))
    session = open_session(augmented)
    assert cached.cached_head(augmented, session, data, None, TrainConfig(progress=False)) is None
    torch.manual_seed(0)
    lora = export_module(SmallCNN(), {"pixel_values": torch.zeros(2, 1, 16, 16)}, tmp_path / "lora",
                         ExportConfig(task="classification", labels=LABELS, engine="portable",
                                      adapter=AdapterConfig(target_modules=("features.4",), trainable_modules=("fc",))),
                         preprocessing=SPEC)
    assert "head_bundle" not in lora.manifest.pooling and cached.head_bundle(lora) is None
