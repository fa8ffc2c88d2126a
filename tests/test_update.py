"""Saved adapters: edgeft's update file round-trips bit-exactly; the PEFT folder loads with PEFT and
gives the ONNX eval model's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeft.config import TrainConfig
from edgeft.data import DataConfig, batches, load_dataset
from edgeft.errors import DataError
from edgeft.train.session import TrainingSession
from edgeft.train.trainer import train
from edgeft.update import AdapterUpdate, load_update, save_peft_adapter, save_update


@pytest.fixture(scope="module")
def trained(tiny_bundle, small_banking):
    data = load_dataset(DataConfig(small_banking["train"], label_column="category"), tiny_bundle)
    return train(tiny_bundle, data, TrainConfig(max_steps=10, learning_rate=3e-2, progress=False))


def test_update_round_trip_is_exact_and_binary(tmp_path, trained, tiny_bundle):
    update = AdapterUpdate(trained.parameters, 500, {"val_accuracy": 0.5}, tiny_bundle.digest)
    path = save_update(tmp_path / "u.safetensors", update)
    loaded = load_update(path)
    assert loaded.n_examples == 500 and loaded.metrics == {"val_accuracy": 0.5}
    assert loaded.bundle_digest == tiny_bundle.digest
    for name, value in update.tensors.items():
        assert loaded.tensors[name].dtype == np.float32
        np.testing.assert_array_equal(loaded.tensors[name], value)
    n_values = sum(v.size for v in update.tensors.values())
    assert path.stat().st_size < 4 * n_values + 8192  # raw float32 bytes plus a small header


def test_update_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_update(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(DataError, match="not a readable edgeft update"):
        load_update(junk)


def test_peft_adapter_loads_onto_the_base_model_with_the_same_logits(tmp_path, trained, tiny_bundle,
                                                                       tiny_bert_dir, small_banking):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    folder = save_peft_adapter(tmp_path / "peft", trained.parameters, tiny_bundle.manifest)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and set(config["target_modules"]) == {"query", "value"}
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=77)
    model = PeftModel.from_pretrained(base, folder).eval()
    data = load_dataset(DataConfig(small_banking["test"], label_column="category"), tiny_bundle)
    batch = next(batches(data, 16, 0))
    session = TrainingSession(tiny_bundle)
    session.set_parameters(trained.parameters)
    _, ort_logits = session.eval_step(batch)
    with torch.no_grad():
        peft_logits = model(input_ids=torch.from_numpy(batch["input_ids"]),
                            attention_mask=torch.from_numpy(batch["attention_mask"])).logits.numpy()
    np.testing.assert_allclose(ort_logits, peft_logits, atol=1e-4, rtol=0)
    assert np.abs(ort_logits - TrainingSession(tiny_bundle).eval_step(batch)[1]).max() > 1e-3  # it did train


def test_updates_are_checked_against_the_manifest(trained, tiny_bundle):
    from edgeft.update import check_update

    good = dict(trained.parameters)
    check_update(AdapterUpdate(good, 10), tiny_bundle.manifest)
    name = next(iter(good))
    cases = {
        "missing": {k: v for k, v in good.items() if k != name},
        "unknown": {**good, "rogue.weight": np.zeros(2, np.float32)},
        "has shape": {**good, name: np.zeros((1, 1), np.float32)},
        "has dtype": {**good, name: good[name].astype(np.float64)},
        "NaN": {**good, name: np.full_like(good[name], np.nan)},
    }
    for message, tensors in cases.items():
        with pytest.raises(DataError, match=message):
            check_update(AdapterUpdate(tensors, 10), tiny_bundle.manifest)
    with pytest.raises(DataError, match="n_examples"):
        check_update(AdapterUpdate(good, 0), tiny_bundle.manifest)


def test_example_counts_and_the_norm_of_the_change_are_bounded(trained, tiny_bundle):
    from edgeft.update import check_update, update_norm

    good = dict(trained.parameters)
    reference = {k: v - 0.01 for k, v in good.items()}  # as if trained from this global adapter
    change = update_norm(good, reference)
    elements = sum(v.size for v in good.values())
    assert change == pytest.approx(0.01 * np.sqrt(elements), rel=1e-4)
    check_update(AdapterUpdate(good, 10), tiny_bundle.manifest, max_examples=10, reference=reference,
                 max_norm=change * 1.01)
    with pytest.raises(DataError, match="above the job's max_update_examples=10") as info:
        check_update(AdapterUpdate(good, 11), tiny_bundle.manifest, max_examples=10)
    assert info.value.reason == "n_examples"
    scaled = {k: reference[k] + 100 * (v - reference[k]) for k, v in good.items()}  # a boosted update
    with pytest.raises(DataError, match="change from the round's global adapter is .* above the job's bound") as info:
        check_update(AdapterUpdate(scaled, 10), tiny_bundle.manifest, reference=reference, max_norm=change * 10)
    assert info.value.reason == "norm"
    infinite = {**good, next(iter(good)): np.full_like(next(iter(good.values())), np.inf)}
    with pytest.raises(DataError, match="NaN or infinite") as info:  # never a NaN norm slipping past the bound
        check_update(AdapterUpdate(infinite, 10), tiny_bundle.manifest, reference=reference, max_norm=1.0)
    assert info.value.reason == "non_finite"
