"""Deployment: the merged model computes what base + adapter computed; every mode makes a package that
predicts; the budget and bad input are handled."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from edgeft.data import DataConfig, batches, load_dataset
from edgeft.deploy import DeployConfig, deploy
from edgeft.deploy.package import within_budget
from edgeft.errors import BundleError, ConfigError, NotFound
from edgeft.predict import Predictor
from edgeft.train.session import TrainingSession


def config(tmp_path, tiny_bert_dir, tiny_bundle, adapter, small_banking, mode="int8", **kw):
    return DeployConfig(model_dir=tiny_bert_dir, bundle=tiny_bundle.path, adapter=adapter, out=tmp_path / mode,
                        mode=mode, eval_data=DataConfig(small_banking["test"], label_column="category"), **kw)


def test_merged_model_equals_base_plus_adapter(tmp_path, tiny_bert_dir, tiny_bundle, adapter, small_banking):
    deploy(config(tmp_path, tiny_bert_dir, tiny_bundle, adapter, small_banking, mode="none"))
    graph = onnx.load(str(tmp_path / "none" / "model.onnx"))
    assert not [n.name for n in graph.graph.node if "lora" in n.name.lower()]
    assert not [i.name for i in graph.graph.initializer if "lora" in i.name.lower()]
    data = load_dataset(DataConfig(small_banking["test"], label_column="category"), tiny_bundle)
    batch = next(batches(data, 16, 0))
    session = TrainingSession(tiny_bundle)
    from edgeft.update import load_update

    session.set_parameters(load_update(adapter).tensors)
    _, expected = session.eval_step(batch)
    merged = Predictor(tmp_path / "none").run({k: batch[k] for k in ("input_ids", "attention_mask")})
    np.testing.assert_allclose(merged, expected, atol=1e-4, rtol=0)


def test_sentence_pooled_model_deploys_with_its_pooling(tmp_path, tiny_sentence_dir, tiny_sentence_bundle,
                                                        small_banking):
    """A head on the model's own sentence pooling: the merged package computes what the bundle computed."""
    from edgeft.config import TrainConfig
    from edgeft.train.trainer import train
    from edgeft.update import AdapterUpdate, save_update

    data = load_dataset(DataConfig(small_banking["train"], label_column="category"), tiny_sentence_bundle)
    result = train(tiny_sentence_bundle, data, TrainConfig(max_steps=5, learning_rate=3e-2, progress=False))
    adapter = tmp_path / "update.safetensors"
    save_update(adapter, AdapterUpdate(result.parameters, result.n_examples, {}, tiny_sentence_bundle.digest))
    deploy(config(tmp_path, tiny_sentence_dir, tiny_sentence_bundle, adapter, small_banking, mode="none"))
    test = load_dataset(DataConfig(small_banking["test"], label_column="category"), tiny_sentence_bundle)
    batch = next(batches(test, 16, 0))
    session = TrainingSession(tiny_sentence_bundle)
    session.set_parameters(result.parameters)
    _, expected = session.eval_step(batch)
    merged = Predictor(tmp_path / "none").run({k: batch[k] for k in ("input_ids", "attention_mask")})
    np.testing.assert_allclose(merged, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["none", "fp16", "int8", "int8-static", "int4"])
def test_every_mode_makes_a_package_that_predicts(tmp_path, tiny_bert_dir, tiny_bundle, adapter, small_banking, mode):
    report = deploy(config(tmp_path, tiny_bert_dir, tiny_bundle, adapter, small_banking, mode=mode,
                           accuracy_budget=100))
    package = tmp_path / mode
    assert {p.name for p in package.iterdir()} >= {"model.onnx", "tokenizer.json", "package.json", "report.json",
                                                   "report.md"}
    assert json.loads((package / "package.json").read_text())["good"] is True
    for key in ("size_mb", "accuracy", "macro_f1", "latency_batch1", "latency_batch32"):
        assert key in report["fp32"] and key in report["deployed"]
    if mode == "int8":
        assert report["size_ratio"] < 0.4
    if mode == "fp16":
        assert 0.4 < report["size_ratio"] < 0.6
    if mode == "int4":
        assert report["size_ratio"] <= 0.20
        graph = onnx.load(str(package / "model.onnx")).graph
        weights = {i.name for i in graph.initializer}
        float_tables = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2}
        # the embedding tables are looked up in their int4 packing
        assert not [n.name for n in graph.node if n.op_type == "Gather" and n.input[0] in float_tables]
        # every encoder Linear (2 layers x query, key, value, output, 2 feed-forward) runs as MatMulNBits
        assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 12
        assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights
                    and "/encoder/" in n.name]
    if mode == "int8-static":
        graph = onnx.load(str(package / "model.onnx")).graph
        producers = {out: node.op_type for node in graph.node for out in node.output}
        matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
        assert matmuls, "the QDQ graph keeps MatMul/Gemm between DequantizeLinear and QuantizeLinear"
        for node in matmuls:
            assert all(producers.get(i) == "DequantizeLinear" for i in node.input[:2]), node.name
    predictions = Predictor(package).predict(["where is my card?", "I was charged twice"])
    assert len(predictions) == 2 and all(label in json.loads((package / "package.json").read_text())["labels"]
                                         for label, _ in predictions)


def test_fixed_shape_qdq_package_for_npus(tmp_path, tiny_bert_dir, tiny_bundle, adapter, small_banking):
    report = deploy(config(tmp_path, tiny_bert_dir, tiny_bundle, adapter, small_banking, mode="int8-static",
                           fixed_shape=(4, 32), accuracy_budget=100,
                           calibration_data=DataConfig(small_banking["train"], label_column="category")))
    model = onnx.load(str(tmp_path / "int8-static" / "model.onnx"))
    for value in model.graph.input:
        assert [d.dim_value for d in value.type.tensor_type.shape.dim] == [4, 32]
    assert report["fixed_shape"] == [4, 32] and report["calibration"].endswith("train.csv")
    predictor = Predictor(tmp_path / "int8-static")
    texts = ["where is my card?", "I was charged twice", "my top-up failed", "change my PIN", "card declined"]
    assert len(predictor.predict(texts)) == 5  # 5 texts run as a full batch of 4 and a padded one
    # each text gives the same logits alone as among others (padding rows and columns change nothing)
    np.testing.assert_allclose(predictor.logits(texts)[4], predictor.logits(texts[4:])[0], atol=1e-5)
    with pytest.raises(ConfigError, match="fixed_shape"):
        config(tmp_path, tiny_bert_dir, tiny_bundle, adapter, small_banking, fixed_shape=(0, 32))


def test_accuracy_budget():
    assert within_budget(0.4, 1.0) and within_budget(None, 0.0) and within_budget(-0.2, 0.0)
    assert not within_budget(1.5, 1.0)


def test_bad_input(tmp_path, tiny_bert_dir, tiny_bundle, adapter, small_banking):
    from edgeft.export.toy import tiny_bert
    from edgeft.demo import minilm_dir

    other = tiny_bert(tmp_path / "other", minilm_dir() / "tokenizer.json", num_labels=77, seed=1)
    with pytest.raises(ConfigError, match="not the base model"):
        deploy(DeployConfig(model_dir=other, bundle=tiny_bundle.path, adapter=adapter, out=tmp_path / "x"))
    with pytest.raises(ConfigError, match="either an adapter"):
        DeployConfig(model_dir=tiny_bert_dir, out=tmp_path / "x")
    with pytest.raises(NotFound, match="not a coordinator state folder"):
        deploy(DeployConfig(model_dir=tiny_bert_dir, out=tmp_path / "x", state_dir=tmp_path, job="j"))
    with pytest.raises(ConfigError, match="give them with its state folder"):  # a bucket belongs to a state
        DeployConfig(model_dir=tiny_bert_dir, bundle=tiny_bundle.path, adapter=adapter, out=tmp_path / "x",
                     artifacts="s3://bucket/prefix")
    from edgeft.update import load_update, save_update

    wrong = load_update(adapter)
    wrong.tensors.popitem()
    save_update(tmp_path / "wrong.safetensors", wrong)
    with pytest.raises(ConfigError, match="does not fit the base model"):
        deploy(DeployConfig(model_dir=tiny_bert_dir, bundle=tiny_bundle.path, adapter=tmp_path / "wrong.safetensors",
                            out=tmp_path / "x"))
    with pytest.raises(BundleError, match="not a deployment package"):
        Predictor(tmp_path / "nothing")
    deploy(config(tmp_path, tiny_bert_dir, tiny_bundle, adapter, small_banking, mode="none"))
    (tmp_path / "none" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="cannot load"):
        Predictor(tmp_path / "none")


def test_predict_cli_without_torch(tmp_path, tiny_bert_dir, tiny_bundle, adapter, small_banking):
    deploy(config(tmp_path, tiny_bert_dir, tiny_bundle, adapter, small_banking, mode="int8", accuracy_budget=100))
    out = tmp_path / "preds.csv"
    code = ("import sys\nfor n in ('torch', 'transformers', 'peft'): sys.modules[n] = None\n"
            "from edgeft.cli import main\n"
            f"sys.exit(main(['predict', '--model', {str(tmp_path / 'int8')!r}, '--input', "
            f"{str(small_banking['test'])!r}, '--output', {str(out)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "execution provider: CPUExecutionProvider" in proc.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "text,category,label,score" and len(lines) == 309
