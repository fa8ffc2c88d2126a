"""Gradient checkpointing on the portable engine (edgeft.export.segmented, edgeft.train.segmented): the training step
run layer by layer computes what the portable engine's one-graph step computes (loss, LoRA gradients, parameters
after AdamW steps), for Llama, Qwen2 (tied output layer, biases) and Phi-3 (fused projections), on packed rows with
a masked prompt, recomputing whole layers (Llama) or keeping the projections' outputs (Qwen2, Phi-3); with a low-bit base the layer graphs dequantise what quantise_array stored; the trainer trains and
evaluates such a bundle; what it cannot split is refused by name."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgeft.config import AdapterConfig, ExportConfig, TrainConfig
from edgeft.data import DataConfig, load_dataset
from edgeft.errors import ConfigError, ExportError
from edgeft.export import export_hf
from edgeft.export.lowbit import BLOCK, dequantised_inputs, int4_words, quantise_array
from edgeft.export.toy import tiny_gpt2, tiny_llama, tiny_phi3, tiny_qwen2
from edgeft.train.engines import open_session
from edgeft.train.segmented import SegmentedSession
from edgeft.train.trainer import evaluate, pad_id_of, train

BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "phi3": tiny_phi3}


def config(**changes: object) -> ExportConfig:
    return ExportConfig(task="causal-lm", max_length=64, adapter=AdapterConfig(rank=4), **changes)


@pytest.fixture(scope="module", params=["llama", "qwen2", pytest.param("phi3", marks=pytest.mark.slow)])
def pair(request, tmp_path_factory, shakespeare):  # noqa: ANN001, ANN201
    """(the portable bundle, the same exported with gradient checkpointing) of a tiny decoder; Qwen2's and Phi-3's
    keep their projections' outputs for the backward pass."""
    tmp = tmp_path_factory.mktemp(f"segmented-{request.param}")
    folder = BUILDERS[request.param](tmp / "model", shakespeare.read_text()[:50_000], vocab_size=384)
    keep = request.param != "llama"
    return (export_hf(folder, tmp / "whole", config()),
            export_hf(folder, tmp / "segmented", config(gradient_checkpointing=True, keep_projections=keep)))


def packed_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Three rows: one with a masked prompt, one holding two packed examples, one with padding."""
    ids = rng.integers(1, 300, size=(3, 12)).astype(np.int64)
    mask = np.ones((3, 12), np.int64)
    mask[1, 6:] = 2
    mask[2, 9:] = 0
    labels = ids.copy()
    labels[mask == 0] = -100
    labels[0, :4] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def products_of(graph: onnx.GraphProto, weight: str) -> list[onnx.NodeProto]:
    """The MatMuls that read ``weight`` (through transposes and reshapes)."""
    names = {weight}
    for _ in range(3):
        names |= {o for n in graph.node if n.op_type in ("Transpose", "Reshape") and set(n.input) & names
                  for o in n.output}
    return [n for n in graph.node if n.op_type == "MatMul" and set(n.input) & names]


def test_layer_by_layer_steps_equal_the_whole_graph(pair):  # noqa: ANN001
    whole, segmented = (open_session(b) for b in pair)
    assert isinstance(segmented, SegmentedSession) and not isinstance(whole, SegmentedSession)
    kept = pair[1].manifest.segmented["kept"]
    graph = onnx.load(str(pair[1].file("segmented_layer_grad.onnx"))).graph
    phi3 = "phi3" in str(pair[1].path)
    if kept:  # q, k, v, gate, up (Phi-3: qkv, gate_up) fed from the forward pass: their products are not recomputed
        assert len(kept) == (2 if phi3 else 5)
        assert [i.name for i in graph.input][-len(kept):] == kept
    for name in ("mlp.gate_up_proj", "self_attn.qkv_proj") if phi3 else ("mlp.gate_proj", "self_attn.q_proj"):
        assert len(products_of(graph, name + ".base_layer.weight")) == (1 if kept else 2), name  # backward (+ recompute)
    # o_proj: the gradient of its input, and recomputed (the residual stream the MLP's norm reads): twice either way
    assert len(products_of(graph, "self_attn.o_proj.base_layer.weight")) == 2
    rng = np.random.default_rng(0)
    start = {n: (v + rng.normal(scale=0.05, size=v.shape)).astype(np.float32)  # LoRA B off zero: every path counts
             for n, v in whole.get_parameters().items()}
    whole.set_parameters(start)
    segmented.set_parameters(start)
    batch = packed_batch(rng)
    for step in range(3):
        expected, _ = whole.train_step(batch)
        loss, logits = segmented.train_step(batch)
        assert logits is None
        assert loss == pytest.approx(expected, rel=1e-5), step
        if step == 0:
            for name in whole.names:
                reference = whole._grads[name].numpy()
                scale = np.abs(reference).max() + 1e-12
                assert np.abs(segmented._grads[name].numpy() - reference).max() / scale < 1e-4, name
        whole.optimizer_step(1e-2)
        segmented.optimizer_step(1e-2)
    after, mine = whole.get_parameters(), segmented.get_parameters()
    assert max(float(np.abs(after[n] - mine[n]).max()) for n in after) < 2e-3
    assert segmented.eval_step(batch)[0] == pytest.approx(whole.eval_step(batch)[0], rel=1e-5)


@pytest.mark.parametrize(("bits", "cols", "kind"), [(4, 64, "int4"), (8, 64, "int8"), (4, 48, "int8")])
def test_layer_graphs_dequantise_what_was_stored(bits, cols, kind):  # noqa: ANN001
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["out"])], "g",
                              [helper.make_tensor_value_info("w", TensorProto.FLOAT, [6, cols])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [6, cols])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert dequantised_inputs(model, {"w": (6, cols)}, bits) == {"w": kind}
    weight = np.random.default_rng(1).normal(size=(6, cols)).astype(np.float32)
    q, scale = quantise_array(weight, bits)
    fed = int4_words(q) if kind == "int4" else q
    out = ort.InferenceSession(model.SerializeToString()).run(None, {"w.q": fed, "w.scale": scale.astype(np.float32)})[0]
    if kind == "int4":  # two signed nibbles a byte, the first low, one scale per block of BLOCK
        nibbles = np.stack([q & 15, q >> 4], axis=-1).reshape(6, cols).astype(np.int8)
        values = np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.float32)
        expected = (values.reshape(6, cols // BLOCK, BLOCK) * scale[..., None]).reshape(6, cols)
    else:
        expected = q.astype(np.float32) * scale[:, None]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert np.abs(out - weight).max() <= np.abs(weight).max() / (7 if kind == "int4" else 127)


def test_trainer_trains_and_evaluates_a_checkpointed_bundle_with_an_int4_base(tmp_path, shakespeare):  # noqa: ANN001
    folder = tiny_qwen2(tmp_path / "qwen2", shakespeare.read_text()[:50_000], vocab_size=384, hidden_size=128)
    fp32 = export_hf(folder, tmp_path / "fp32", config(gradient_checkpointing=True))
    int4 = export_hf(folder, tmp_path / "int4", config(gradient_checkpointing=True, base_bits=4))
    assert int4.manifest.segmented["quantised"] and not fp32.manifest.segmented["quantised"]
    layers = int4.file("segmented_layers.safetensors").stat().st_size
    assert layers < 0.3 * fp32.file("segmented_layers.safetensors").stat().st_size
    text = tmp_path / "shakespeare.txt"
    text.write_text(shakespeare.read_text()[:30_000])
    data = load_dataset(DataConfig(text), int4).subset(np.arange(48))
    before = evaluate(open_session(fp32), data, "causal-lm", pad_id_of(fp32))
    quantised = evaluate(open_session(int4), data, "causal-lm", pad_id_of(int4))
    assert abs(quantised["loss"] - before["loss"]) < 0.05  # random weights: int4 barely moves the loss
    assert quantised["tokens"] == before["tokens"] > 0
    result = train(int4, data, TrainConfig(epochs=2, batch_size=8, learning_rate=1e-2, progress=False), val_data=data)
    assert result.history[-1]["val_loss"] < quantised["loss"] - 0.05


def test_what_cannot_be_split_is_refused(tmp_path, shakespeare):  # noqa: ANN001
    text = shakespeare.read_text()[:20_000]
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        config(gradient_checkpointing=True, loss="dpo")
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        ExportConfig(task="classification", labels=("a", "b"), gradient_checkpointing=True)
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        config(gradient_checkpointing=True, engine="ort-training")
    with pytest.raises(ConfigError, match="keep_projections.*gradient_checkpointing"):
        config(keep_projections=True)
    gpt2 = tiny_gpt2(tmp_path / "gpt2", text, vocab_size=300)
    with pytest.raises(ExportError, match="families.*gpt2"):
        export_hf(gpt2, tmp_path / "a", config(gradient_checkpointing=True))
    llama = tiny_llama(tmp_path / "llama", text, vocab_size=300)
    with pytest.raises(ExportError, match="outside them"):
        export_hf(llama, tmp_path / "b", ExportConfig(task="causal-lm", gradient_checkpointing=True,
                                                       adapter=AdapterConfig(target_modules=("q_proj", "lm_head"))))
