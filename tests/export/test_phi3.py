"""Phi-3 as a causal LM (``edgeft export --task causal-lm``): its query, key and value projections are one fused
``qkv_proj`` and its gate and up projections one ``gate_up_proj``. Both engines export a tiny Phi-3 chat model with
LoRA on those fused projections by default, and train it as PyTorch + PEFT does (test_parity's checks)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_parity import ENGINES, assert_parity, chat_file, run_engines

from edgeft.config import AdapterConfig, ExportConfig
from edgeft.data import DataConfig, load_dataset
from edgeft.export import export_hf, from_hf_folder

PHI3_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
CONFIG = ExportConfig(task="causal-lm", max_length=96, adapter=AdapterConfig(rank=4))
HIDDEN, HEADS, KV_HEADS = 64, 4, 2  # tiny_phi3's widths (edgeft.export.toy._decoder)


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory, shakespeare):  # noqa: ANN001, ANN201
    from edgeft.export.toy import tiny_phi3

    return tiny_phi3(tmp_path_factory.mktemp("phi3"), shakespeare.read_text()[:100_000], vocab_size=384,
                     hidden_size=HIDDEN, chat=True)


@pytest.fixture(scope="module")
def phi3_bundle(phi3_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    """``phi3_bundle(engine)``: the tiny Phi-3 exported for that engine, once per module."""
    out, made = tmp_path_factory.mktemp("phi3-bundles"), {}

    def export(engine: str):  # noqa: ANN202
        if engine not in made:
            made[engine] = export_hf(phi3_dir, out / engine, replace(CONFIG, engine=engine))
        return made[engine]

    return export


# the portable engine's export takes 30-50 s on a 2-core machine (ort-training's about 1 s)
@pytest.mark.parametrize("engine", ["ort-training", pytest.param("portable", marks=pytest.mark.slow)])
def test_default_lora_targets_are_the_fused_projections(engine, phi3_bundle):
    """LoRA on qkv_proj, o_proj, gate_up_proj and down_proj of every layer, shaped for the fused outputs (query,
    key and value heads; gate and up halves), with PEFT's keys; the output layer and embeddings stay frozen."""
    head = HIDDEN // HEADS
    out_features = {"qkv_proj": (HEADS + 2 * KV_HEADS) * head, "o_proj": HIDDEN, "gate_up_proj": 2 * 2 * HIDDEN,
                    "down_proj": HIDDEN}
    manifest = phi3_bundle(engine).manifest
    assert manifest.base_model["model_type"] == "phi3"
    assert manifest.adapter["target_modules"] == list(PHI3_TARGETS)
    assert sorted(manifest.peft_config["target_modules"]) == sorted(PHI3_TARGETS)
    assert len(manifest.trainable) == 2 * len(PHI3_TARGETS) * 2  # A and B, four targets, two layers
    for spec in manifest.trainable:
        target = next(t for t in PHI3_TARGETS if f".{t}." in spec.name)
        if ".lora_B." in spec.name:
            assert spec.shape == [out_features[target], 4], spec.name
        assert spec.peft_key and "lm_head" not in spec.name and "embed" not in spec.name


@pytest.mark.slow
def test_both_engines_match_pytorch_peft_on_chat_data(phi3_bundle, phi3_dir, shakespeare, tmp_path):
    """Chat turns with the loss on the assistant's tokens: both engines' losses and updates match PyTorch + PEFT
    over 20 steps (test_parity.assert_parity)."""
    bundles = {engine: phi3_bundle(engine) for engine in ENGINES}
    data = load_dataset(DataConfig(chat_file(shakespeare, tmp_path)), bundles["portable"])
    masked = np.mean([(labels == -100).mean() for labels in data.labels])
    assert 0.5 < masked < 0.95, masked  # the system prompt and the user's line carry no loss
    assert_parity(*run_engines(bundles, from_hf_folder(phi3_dir, CONFIG), CONFIG, data, 3e-3))
