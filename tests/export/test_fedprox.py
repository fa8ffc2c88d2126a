"""FedProx built into the training artifacts: the loss adds mu/2 * ||w - w_global||^2 over the trainable
parameters, w_global being frozen anchors the device sets to the round's global adapter; bundles without
the option are unchanged. Both engines (the portable one's bundle takes a slow export)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeft.config import ExportConfig, OptimizerConfig
from edgeft.errors import ConfigError, TrainingError
from edgeft.train.engines import open_session

MU = 0.5
BATCH = {"input_ids": np.array([[101, 2054, 2003, 102], [101, 7592, 102, 0]], np.int64),
         "attention_mask": np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.int64), "labels": np.array([3, 7], np.int64)}


ENGINES = ["ort-training", pytest.param("portable", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=ENGINES)
def prox_bundle(request, export_once, tiny_bert_dir, tiny_config):
    """The tiny BERT with plain SGD (so one step is w - lr * gradient, exactly) and a proximal term."""
    config = ExportConfig(labels=tiny_config.labels, max_length=32, proximal_mu=MU, engine=request.param,
                          optimizer=OptimizerConfig(name="sgd", weight_decay=0.0))
    return export_once(tiny_bert_dir, config)


@pytest.mark.parametrize("bundle", ["tiny_bundle", pytest.param("tiny_portable_bundle", marks=pytest.mark.slow)])
def test_bundle_without_fedprox_has_no_proximal_key(bundle, request):
    bundle = request.getfixturevalue(bundle)
    assert bundle.manifest.proximal is None
    assert "proximal" not in json.loads(bundle.file("manifest.json").read_text())
    with pytest.raises(TrainingError, match="no proximal term"):
        open_session(bundle, threads=1).set_proximal_anchor({})


def test_anchors_are_frozen_parameters_named_after_the_trainable_ones(prox_bundle):
    manifest = prox_bundle.manifest
    assert manifest.proximal == {"mu": MU, "anchor_prefix": "proximal_anchor."}
    assert not any(n.startswith("proximal_anchor.") for n in manifest.trainable_names)  # never uploaded
    session = open_session(prox_bundle, threads=1)
    if manifest.engine == "ort-training":
        anchors = {}
        for name in manifest.trainable_names:
            anchor = session._state.parameters["proximal_anchor." + name]
            assert not anchor.requires_grad
            anchors[name] = anchor.data
    else:  # graph inputs the session feeds; the gradient graph has no gradient output for them
        import onnx

        graph = onnx.load(str(prox_bundle.file("portable_gradient.onnx")), load_external_data=False).graph
        inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
        assert {"proximal_anchor." + n for n in manifest.trainable_names} <= inputs
        assert not any(o.startswith("grad.proximal_anchor.") for o in outputs)
        anchors = {name: session._anchors["proximal_anchor." + name].numpy() for name in manifest.trainable_names}
    parameters = session.get_parameters()
    for name in manifest.trainable_names:
        np.testing.assert_array_equal(anchors[name], parameters[name])  # exported at w_0


def test_loss_adds_half_mu_squared_distance(prox_bundle):
    session = open_session(prox_bundle, threads=1)
    start = session.get_parameters()
    plain, _ = session.eval_step(BATCH)  # anchors equal the parameters: no penalty
    shifted = {name: value + 0.25 for name, value in start.items()}
    session.set_proximal_anchor(shifted)
    penalised, _ = session.eval_step(BATCH)
    size = sum(v.size for v in start.values())
    assert penalised - plain == pytest.approx(0.5 * MU * 0.25 ** 2 * size, rel=1e-4)
    session.set_parameters(shifted)  # a global adapter moves the anchors with it: no penalty again
    assert session.eval_step(BATCH)[0] != pytest.approx(penalised)
    session.set_parameters(start, proximal_anchor=False)
    assert session.eval_step(BATCH)[0] == pytest.approx(penalised, rel=1e-6)


def test_sgd_step_adds_the_proximal_gradient(prox_bundle):
    """w' = w - lr * (grad_task + mu * (w - w_global)): with w_global = w + d the step differs by lr * mu * d."""
    lr, d = 0.1, 0.3
    after = []
    for offset in (0.0, d):
        session = open_session(prox_bundle, threads=1)
        start = session.get_parameters()
        session.set_proximal_anchor({name: value + offset for name, value in start.items()})
        session.train_step(BATCH)
        session.optimizer_step(lr)
        after.append(session.get_parameters())
    for name in start:
        np.testing.assert_allclose(after[1][name] - after[0][name], lr * MU * d, atol=1e-6, err_msg=name)


def test_proximal_mu_validation():
    with pytest.raises(ConfigError, match="proximal_mu"):
        ExportConfig(labels=("a", "b"), proximal_mu=-0.1)
    with pytest.raises(ConfigError, match="proximal_mu"):
        ExportConfig(labels=("a", "b"), proximal_mu=float("nan"))
