"""The causal-LM path: a GPT-2 built from a config, LoRA, Tiny Shakespeare; perplexity goes down. Both engines
(the portable bundle's export is slow)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.config import TrainConfig
from edgeft.data import DataConfig, batches, load_dataset, split
from edgeft.export import from_hf_folder
from edgeft.export.reference import reference_for
from edgeft.train.engines import open_session
from edgeft.train.trainer import evaluate, train

BUNDLES = ["tiny_lm_bundle", pytest.param("tiny_lm_portable_bundle", marks=pytest.mark.slow)]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_lm_perplexity_goes_down(bundle, request, tmp_path, shakespeare):
    tiny_lm_bundle = request.getfixturevalue(bundle)
    text = tmp_path / "shakespeare.txt"
    text.write_text(shakespeare.read_text()[:60_000])
    data = load_dataset(DataConfig(text), tiny_lm_bundle)
    train_data, val_data = split(data, 0.1, seed=0)
    before = evaluate(open_session(tiny_lm_bundle), val_data, "causal-lm", 0)
    result = train(tiny_lm_bundle, train_data, TrainConfig(epochs=3, batch_size=16, learning_rate=2e-2,
                                                           progress=False), val_data)
    ppl = [r["val_perplexity"] for r in result.history]
    # down after the first epoch and after the second; the third may level off (343.866 after 343.863, seen on an
    # AVX-512 Xeon), so it is held to be below the first
    assert ppl[0] < before["perplexity"] and ppl[1] < ppl[0] and ppl[2] < ppl[0]
    assert ppl[-1] < 0.9 * before["perplexity"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_lm_logits_match_torch_on_padded_batches(bundle, request, tiny_gpt2_dir, tiny_lm_config, shakespeare, tmp_path):
    """Right-padded batches of another length than the export's: ORT's logits equal torch's on real tokens."""
    tiny_lm_bundle = request.getfixturevalue(bundle)
    text = tmp_path / "s.txt"
    text.write_text(shakespeare.read_text()[:3000])
    data = load_dataset(DataConfig(text), tiny_lm_bundle)
    data.ids[1] = data.ids[1][:20]
    batch = next(batches(data.subset([0, 1, 2]), 3, 0))
    _, logits = open_session(tiny_lm_bundle).eval_step(batch)
    reference = reference_for(from_hf_folder(tiny_gpt2_dir, tiny_lm_config), tiny_lm_config, tiny_lm_bundle)
    keep = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(logits[keep], reference.logits(batch)[keep], atol=1e-4, rtol=0)
    assert tiny_lm_bundle.manifest.adapter["target_modules"] == ["c_attn", "c_proj", "c_fc"]  # causal-LM default
