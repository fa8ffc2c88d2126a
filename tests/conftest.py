"""Shared fixtures: tiny real models built from configs, bundles exported from them, shipped data."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeft.config import AdapterConfig, ExportConfig
from edgeft.datasets import BANKING77_DIR, TINYSHAKESPEARE, banking77_labels

LABELS = tuple(banking77_labels())
REPO = Path(__file__).resolve().parents[1]
# The device the plain-runtime tests install: Python 3.13 and the current plain onnxruntime (portable engine only).
DEVICE_PYTHON, DEVICE_RUNTIME = "python3.13", "onnxruntime==1.32.0"


@pytest.fixture(autouse=True)
def _device_commands_leave_torch_importable():  # noqa: ANN202
    """A device command run in-process (``edgeft train`` in test_cli) blocks torch, transformers, peft and optimum
    for the rest of the process (``edgeft.train.session.keep_torch_out``); later tests that export or deploy need
    them, so the blocks are lifted after each test."""
    yield
    import sys

    from edgeft.train.session import HOST_ONLY_PACKAGES

    for name in HOST_ONLY_PACKAGES:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


def minilm_tokenizer() -> Path:
    from edgeft.demo import minilm_dir

    return minilm_dir() / "tokenizer.json"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeft.export.toy import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm_tokenizer(), num_labels=len(LABELS))


@pytest.fixture(scope="session")
def tiny_config() -> ExportConfig:
    return ExportConfig(labels=LABELS, max_length=32, engine="ort-training")  # portable: replace(engine=...)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_config: ExportConfig):
    """A LoRA bundle of the tiny BERT for BANKING77, with the forward graph kept for comparisons."""
    from edgeft.export import export_source, from_hf_folder

    out = tmp_path_factory.mktemp("tiny-bundle") / "bundle"
    return export_source(from_hf_folder(tiny_bert_dir, tiny_config), out, tiny_config, keep_forward_graph=True)


@pytest.fixture(scope="session")
def tiny_bundle_rank2(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_config: ExportConfig):
    """``tiny_bundle``'s model at LoRA rank 2 (a smaller device's bundle of the same job)."""
    from dataclasses import replace

    from edgeft.export import export_hf

    out = tmp_path_factory.mktemp("tiny-bundle-rank2") / "bundle"
    return export_hf(tiny_bert_dir, out, replace(tiny_config, adapter=replace(tiny_config.adapter, rank=2)))


@pytest.fixture(scope="session")
def banking_csv() -> dict[str, Path]:
    return {"train": BANKING77_DIR / "train.csv", "test": BANKING77_DIR / "test.csv"}


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    return TINYSHAKESPEARE


@pytest.fixture(scope="session")
def small_banking(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every 20th BANKING77 row (train) and every 10th (test): real data, small enough for unit tests."""
    import csv

    out = tmp_path_factory.mktemp("banking-small")
    files = {}
    for split, step in (("train", 20), ("test", 10)):
        with open(BANKING77_DIR / f"{split}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        path = out / f"{split}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "category"])
            writer.writeheader()
            writer.writerows(rows[::step])
        files[split] = path
    return files


def lora(**kw) -> AdapterConfig:
    return AdapterConfig(kind="lora", **kw)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, shakespeare: Path) -> Path:
    """A tiny GPT-2 with a byte-level BPE tokenizer trained on Tiny Shakespeare."""
    from edgeft.export.toy import tiny_gpt2

    return tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), shakespeare.read_text()[:200_000], vocab_size=384)


@pytest.fixture(scope="session")
def tiny_lm_config() -> ExportConfig:
    return ExportConfig(task="causal-lm", max_length=64, adapter=AdapterConfig(rank=4), engine="ort-training")


@pytest.fixture(scope="session")
def tiny_lm_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path, tiny_lm_config: ExportConfig):
    """The tiny GPT-2 with LoRA on c_attn (GPT-2's default target)."""
    from edgeft.export import export_hf

    return export_hf(tiny_gpt2_dir, tmp_path_factory.mktemp("tiny-lm") / "bundle", tiny_lm_config)


@pytest.fixture(scope="session")
def tiny_sentence_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT as a sentence-transformers folder: mean pooling, then Normalize."""
    from edgeft.export.toy import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny-sentence"), minilm_tokenizer(), num_labels=len(LABELS),
                     sentence_pooling="mean")


@pytest.fixture(scope="session")
def tiny_sentence_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_sentence_dir: Path, tiny_config: ExportConfig):
    """A LoRA bundle of the tiny sentence model for BANKING77: its head reads the pooled embedding."""
    from edgeft.export import export_hf

    return export_hf(tiny_sentence_dir, tmp_path_factory.mktemp("tiny-sentence-bundle") / "bundle", tiny_config)


@pytest.fixture(scope="session")
def export_once(tmp_path_factory: pytest.TempPathFactory):
    """``export(model_dir, config)``: the bundle of a Hugging Face folder for an ExportConfig, exported once per
    test session (portable exports take tens of seconds; tests of both engines share them)."""
    from edgeft.export import export_hf

    cache: dict = {}

    def export(model_dir: Path, config: ExportConfig):
        key = (str(model_dir), config)
        if key not in cache:
            cache[key] = export_hf(model_dir, tmp_path_factory.mktemp(f"bundle-{config.engine}") / "bundle", config)
        return cache[key]

    return export


@pytest.fixture(scope="session")
def tiny_portable_bundle(export_once, tiny_bert_dir: Path, tiny_config: ExportConfig):
    """``tiny_bundle`` (without the forward graph) for the portable engine."""
    from dataclasses import replace

    return export_once(tiny_bert_dir, replace(tiny_config, engine="portable"))


@pytest.fixture(scope="session")
def tiny_lm_portable_bundle(export_once, tiny_gpt2_dir: Path, tiny_lm_config: ExportConfig):
    """``tiny_lm_bundle`` for the portable engine."""
    from dataclasses import replace

    return export_once(tiny_gpt2_dir, replace(tiny_lm_config, engine="portable"))


@pytest.fixture(scope="session")
def tiny_sentence_portable_bundle(export_once, tiny_sentence_dir: Path, tiny_config: ExportConfig):
    """``tiny_sentence_bundle`` for the portable engine."""
    from dataclasses import replace

    return export_once(tiny_sentence_dir, replace(tiny_config, engine="portable"))


@pytest.fixture(scope="session")
def tiny_distilbert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide DistilBERT for BANKING77 with the MiniLM WordPiece tokenizer."""
    from edgeft.export.toy import tiny_distilbert

    return tiny_distilbert(tmp_path_factory.mktemp("tiny-distilbert"), minilm_tokenizer(), num_labels=len(LABELS))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, shakespeare: Path) -> Path:
    """A 2-layer Llama-architecture decoder (grouped-query attention, RoPE, RMSNorm, SwiGLU) with a byte-level
    BPE tokenizer trained on Tiny Shakespeare."""
    from edgeft.export.toy import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), shakespeare.read_text()[:200_000], vocab_size=384)


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tmp_path_factory: pytest.TempPathFactory, shakespeare: Path) -> Path:
    """A 2-layer, 64-wide Llama-architecture chat model (``tiny_llama(..., chat=True)``: ChatML special tokens and
    chat template) with a byte-level BPE tokenizer trained on Tiny Shakespeare's first 100,000 characters; the
    chat tests (generation, DPO, simulated chat jobs, parity on chat data) share it and its ``export_once``
    bundles. Read-only: copy it to change it."""
    from edgeft.export.toy import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-chat-llama"), shakespeare.read_text()[:100_000], vocab_size=384,
                      chat=True)


@pytest.fixture(scope="session")
def device_venv(pytestconfig, tmp_path_factory):  # noqa: ANN201
    """``device_venv(python, runtime) -> python path``: a device virtualenv (scripts/device_venv.py: that Python,
    that plain onnxruntime, this checkout's edgeft, no torch), kept in pytest's cache folder; skips the test when
    the package index cannot be reached."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_venv", REPO / "scripts" / "device_venv.py")
    tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tools)
    cache = getattr(pytestconfig, "cache", None)
    root = cache.mkdir("device-venvs") if cache is not None else tmp_path_factory.mktemp("device-venvs")

    def make(python: str, runtime: str) -> Path:
        try:
            return tools.device_venv(root, python, runtime)
        except tools.IndexUnreachable as exc:
            pytest.skip(f"cannot install {runtime} and edgeft's device dependencies: {exc}")

    return make


@pytest.fixture(scope="session")
def device_runtime_version() -> str:
    """The plain onnxruntime version of ``device_python``."""
    return DEVICE_RUNTIME.partition("==")[2]


@pytest.fixture(scope="session")
def device_python(device_venv) -> Path:  # noqa: ANN001
    """The python of a device virtualenv: Python 3.13, the current plain onnxruntime, this checkout's edgeft."""
    return device_venv(DEVICE_PYTHON, DEVICE_RUNTIME)
