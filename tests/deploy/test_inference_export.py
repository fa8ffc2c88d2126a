"""The inference export: optimum's exporter for the architectures it supports, torch.onnx otherwise; both
give one opset-17 file of input_ids, attention_mask -> logits that matches PyTorch at any batch and length. A causal
LM that optimum supports is exported with its KV cache (past_key_values.* in, present.* out); fed an empty cache,
it gives the same logits."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeft.deploy import inference
from edgeft.deploy.inference import INFERENCE_OPSET, OPTIMUM, OPTIMUM_KV_CACHE, TORCH_ONNX, export_inference
from edgeft.predict import empty_cache


def _load(kind, tiny_bert_dir, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "bert":
        return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, attn_implementation="eager").eval()
    return AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, attn_implementation="eager").eval()


@pytest.mark.parametrize("exporter", [OPTIMUM, TORCH_ONNX])
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_export_matches_torch(tmp_path, monkeypatch, tiny_bert_dir, tiny_gpt2_dir, kind, exporter):
    model = _load(kind, tiny_bert_dir, tiny_gpt2_dir)
    use_cache = model.config.use_cache
    if exporter == TORCH_ONNX:
        monkeypatch.setattr(inference, "_optimum_config", lambda *a, **k: None)
    path = tmp_path / "model.onnx"
    kv_cache = kind == "gpt2" and exporter == OPTIMUM
    assert export_inference(model, path, causal=kind == "gpt2") == (OPTIMUM_KV_CACHE if kv_cache else exporter)
    assert model.config.use_cache == use_cache  # optimum's overrides are undone

    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # one file, no external data
    graph = onnx.load(str(path))
    assert graph.ir_version <= 10  # what ORT 1.19 accepts
    assert {o.domain: o.version for o in graph.opset_import}[""] == INFERENCE_OPSET
    inputs = [i.name for i in graph.graph.input]
    assert {"input_ids", "attention_mask"} <= set(inputs)
    assert [o.name for o in graph.graph.output][0] == "logits"
    if kv_cache:
        layers = model.config.n_layer
        assert {n for n in inputs if n.startswith("past_key_values.")} == {
            f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")}
    else:
        assert inputs == ["input_ids", "attention_mask"] and [o.name for o in graph.graph.output] == ["logits"]
        for i in graph.graph.input:
            assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "sequence"]

    vocab = model.config.vocab_size
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, length in ((1, 5), (3, 13)):  # neither is the example the export traced
        generator = torch.Generator().manual_seed(batch * 100 + length)
        ids = torch.randint(1, vocab, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        if batch > 1:
            mask[-1, length // 2:] = 0  # right padding, as edgeft.data.pad does
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        got = session.run(["logits"], {**feed, **empty_cache(session, feed["attention_mask"])})[0]
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
        assert got.shape == expected.shape
        if kind == "gpt2":  # padding positions' logits mean nothing (the cache's position ids differ there)
            got, expected = got[mask.numpy() == 1], expected[mask.numpy() == 1]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_optimum_is_used_only_where_it_applies(tiny_bert_dir):
    bert = _load("bert", tiny_bert_dir, None)
    assert inference._optimum_config(bert, causal=False) is not None
    assert inference._optimum_config(bert, causal=True) is None  # no text-generation for BERT in optimum
    assert inference._optimum_config(torch.nn.Linear(4, 2), causal=False) is None  # not a transformers model


def test_optimum_failure_falls_back_to_torch_onnx(tmp_path, monkeypatch, tiny_bert_dir):
    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(inference, "_export_with_optimum", broken)
    with pytest.warns(RuntimeWarning, match="boom"):
        assert export_inference(_load("bert", tiny_bert_dir, None), tmp_path / "m.onnx", causal=False) == TORCH_ONNX
    assert [o.name for o in onnx.load(str(tmp_path / "m.onnx")).graph.output] == ["logits"]
