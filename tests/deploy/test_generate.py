"""Generation with a causal-LM package (edgeft.generate, edgeft generate): a chat Llama fine-tuned a few steps on
chat turns, deployed with its KV cache; greedy decoding equals PyTorch's (transformers' generate on the merged
model) token for token for 32 tokens, the KV-cache path equals recomputing the sequence, sampling is seeded and
bounded by top-p, stop strings cut, and the CLI runs with torch unimportable on an int4 package."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgeft.config import AdapterConfig, ExportConfig, TrainConfig
from edgeft.data import DataConfig, load_dataset
from edgeft.deploy import DeployConfig, deploy, trained_model
from edgeft.errors import ConfigError
from edgeft.generate import Generator, _pick
from edgeft.testing.agents import NO_TORCH
from edgeft.train.trainer import train
from edgeft.update import AdapterUpdate, save_update

TOKENS = 32


@pytest.fixture(scope="module")
def chat_package(tmp_path_factory, shakespeare, tiny_chat_llama_dir, export_once):  # noqa: ANN001, ANN201
    """(model folder, bundle, adapter file, {mode: package folder}) of a tiny chat Llama trained 2 epochs."""
    tmp = tmp_path_factory.mktemp("generate")
    folder = tiny_chat_llama_dir
    bundle = export_once(folder, ExportConfig(task="causal-lm", max_length=96, adapter=AdapterConfig(rank=4),
                                              engine="ort-training"))
    lines = [line for line in shakespeare.read_text()[:40_000].splitlines() if line.strip()]
    rows = [{"messages": [{"role": "user", "content": lines[i]}, {"role": "assistant", "content": lines[i + 1]}]}
            for i in range(64)]
    (tmp / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dataset(DataConfig(tmp / "chat.jsonl"), bundle)
    result = train(bundle, data, TrainConfig(epochs=2, batch_size=8, learning_rate=1e-2, progress=False))
    adapter = tmp / "update.safetensors"
    save_update(adapter, AdapterUpdate(result.parameters, len(data), {}, bundle.digest))
    packages = {}
    for mode in ("none", "int4"):
        packages[mode] = tmp / f"package-{mode}"
        deploy(DeployConfig(out=packages[mode], model_dir=folder, bundle=bundle.path, adapter=adapter, mode=mode,
                            accuracy_budget=100))
    return folder, bundle, adapter, packages


def test_greedy_decoding_equals_pytorch_token_for_token(chat_package):
    folder, bundle, adapter, packages = chat_package
    generator = Generator(packages["none"], threads=1)
    assert generator.kv_cache and generator.template is not None
    meta = json.loads((packages["none"] / "package.json").read_text())
    assert meta["exporter"] == "optimum (KV cache)" and meta["eos_token"] == "<|im_end|>"
    prompt = [{"role": "user", "content": "What say you, my lord?"}]
    ours = generator.generate(prompt, max_new_tokens=TOKENS)
    model = trained_model(bundle, adapter, folder).model
    ids = torch.tensor([generator.prompt_ids(prompt)])
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False,
                                eos_token_id=generator.eos_id, pad_token_id=0)[0, ids.shape[1]:].tolist()
    if theirs and theirs[-1] == generator.eos_id:
        theirs = theirs[:-1]
    assert ours.tokens == theirs and len(ours.tokens) > 0
    assert ours.stopped_by == ("eos" if len(theirs) < TOKENS else "max_new_tokens")


def test_the_kv_cache_path_equals_recomputing_the_sequence(chat_package):
    generator = Generator(chat_package[3]["none"], threads=1)
    prompt = "Good morrow"
    cached = generator.generate(prompt, max_new_tokens=TOKENS, chat=False)
    recomputed = generator.generate(prompt, max_new_tokens=TOKENS, chat=False, use_cache=False)
    assert cached.tokens == recomputed.tokens and len(cached.tokens) == TOKENS


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus(chat_package):
    generator = Generator(chat_package[3]["none"], threads=1)
    a, b = (generator.generate("To be", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3, chat=False)
            for _ in range(2))
    assert a.tokens == b.tokens
    logits = np.array([5.0, 4.0, 0.0, -1.0])  # p = 0.72, 0.26, ...: top_p 0.5 keeps only the first token
    rng = np.random.default_rng(0)
    assert {_pick(logits, 1.0, 0.5, rng) for _ in range(50)} == {0}
    assert {_pick(logits, 1.0, 0.95, rng) for _ in range(200)} == {0, 1}
    text = generator.generate("To be", max_new_tokens=TOKENS, chat=False).text
    cut = generator.generate("To be", max_new_tokens=TOKENS, chat=False, stop=[text[3:5]])
    assert cut.stopped_by == "stop string" and cut.text == text[: text.index(text[3:5])]
    with pytest.raises(ConfigError, match="top_p"):
        generator.generate("x", temperature=0.5, top_p=0)


def test_the_cli_generates_with_an_int4_package_and_torch_unimportable(chat_package):
    package = chat_package[3]["int4"]
    graph_ops = {n.op_type for n in __import__("onnx").load(str(package / "model.onnx")).graph.node}
    assert "MatMulNBits" in graph_ops
    env = {**os.environ, "PYTHONPATH": str(NO_TORCH)}
    done = subprocess.run([sys.executable, "-m", "edgeft.cli", "generate", str(package), "Who art thou?",
                           "--max-new-tokens", "16", "--threads", "1"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tokens/s" in done.stderr and "KV cache" in done.stderr


@pytest.mark.slow
def test_the_plain_onnxruntime_generates_the_same_text(chat_package, device_venv, tmp_path):
    """The package on a device: the plain onnxruntime (pyproject's runtime-check pin) in a virtualenv without torch
    generates what the training build generates (greedy, fp32)."""
    from test_plain_runtime import plain_version

    python = device_venv(sys.executable, f"onnxruntime=={plain_version()}")
    package = chat_package[3]["none"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    done = subprocess.run([str(python), "-m", "edgeft.cli", "generate", str(package), "Who art thou?",
                           "--max-new-tokens", "24", "--threads", "1"], env={**env, "PYTHONNOUSERSITE": "1"},
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = Generator(package, threads=1).generate("Who art thou?", max_new_tokens=24).text
    assert done.stdout.rstrip("\n") == expected
