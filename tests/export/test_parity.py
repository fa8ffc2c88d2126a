"""Both training engines against PyTorch + PEFT: from the same initial weights and batches, 20 optimizer steps
give the same losses (1e-4 relative) and the same trained weights (updates within 0.1%), with and without
gradient accumulation, and the engines agree with each other as closely. Models: tiny BERT, GPT-2, DistilBERT
and Llama built from configs, Llama and Qwen2 chat models on chat turns with the loss on the assistant's tokens
(slow), all-MiniLM-L6-v2 (slow)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np
import pytest
import torch

from edgeft.config import AdapterConfig, ExportConfig
from edgeft.data import DataConfig, batches, load_dataset
from edgeft.export import from_hf_folder
from edgeft.export.reference import reference_for
from edgeft.train.engines import open_session
from edgeft.train.schedule import warmup_linear

ENGINES = ("ort-training", "portable")
STEPS = 20
LOSS_RTOL = 1e-4  # measured: 1e-7 to 7e-7 on every model and engine
UPDATE_RTOL = 1e-3  # measured: 1e-6 to 7e-5
POOL = 4  # batches, visited in turn: the first and the last pass over them must show the loss falling
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
slow = pytest.mark.slow


@dataclass
class Run:
    """One training run: the loss of every micro-batch and the trained parameters."""

    losses: np.ndarray
    parameters: dict[str, np.ndarray]


def run_engines(bundles: dict, source, config: ExportConfig, data, learning_rate: float,
                accum: int = 1) -> tuple[dict[str, np.ndarray], dict[str, Run], Run]:
    """Train each engine's bundle and the PyTorch + PEFT twin side by side on the same batches: STEPS optimizer
    steps of ``accum`` micro-batches each (gradients summed, as the engines do). Returns the initial parameters,
    the engines' runs and the reference run."""
    # One thread each: ONNX Runtime's pool threads spin after every run and starved PyTorch's between them
    # (100x slower reference steps on a 2-core machine).
    sessions = {engine: open_session(bundle, threads=1) for engine, bundle in bundles.items()}
    initial = next(iter(sessions.values())).get_parameters()
    for engine, session in sessions.items():  # the same initial weights whichever engine exported them
        start = session.get_parameters()
        assert start.keys() == initial.keys(), engine
        for name, value in initial.items():
            np.testing.assert_array_equal(start[name], value, err_msg=f"{engine}: {name}")
    reference = reference_for(source, config, next(iter(bundles.values())))
    pool = list(batches(data, 32, 0, shuffle=True, seed=1))[:POOL]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = train_side_by_side(sessions, reference, pool, learning_rate, accum)
    finally:
        torch.set_num_threads(threads)
    runs = {engine: Run(np.array(losses[engine]), session.get_parameters()) for engine, session in sessions.items()}
    return initial, runs, Run(np.array(losses["reference"]), reference.parameters())


def train_side_by_side(sessions: dict, reference, pool: list, learning_rate: float, accum: int) -> dict:
    """The micro-batch losses of each session and of the reference, by name ("reference" for the latter)."""
    losses: dict[str, list[float]] = {engine: [] for engine in [*sessions, "reference"]}
    for step in range(STEPS):
        lr = warmup_linear(step, STEPS, 2, learning_rate)
        for micro in range(accum):
            batch = pool[(step * accum + micro) % len(pool)]
            for engine, session in sessions.items():
                losses[engine].append(session.train_step(batch)[0])
            losses["reference"].append(reference.step(batch, lr, apply=micro == accum - 1))
        for session in sessions.values():
            session.optimizer_step(lr)
    return losses


def update_gap(initial: dict[str, np.ndarray], a: Run, b: Run) -> tuple[str, float]:
    """The parameter whose update differs most between two runs, and by how much (relative to b's update)."""
    gaps = {name: float(np.linalg.norm((a.parameters[name] - start) - (b.parameters[name] - start))
                        / np.linalg.norm(b.parameters[name] - start)) for name, start in initial.items()}
    worst = max(gaps, key=gaps.__getitem__)
    return worst, gaps[worst]


def assert_parity(initial: dict[str, np.ndarray], runs: dict[str, Run], reference: Run) -> None:
    for engine, run in runs.items():  # it learns: the same batches cost less after 19 steps on them
        assert run.losses[-POOL:].mean() < run.losses[:POOL].mean(), f"{engine}: {run.losses}"
    pairs = [(engine, run, "PyTorch + PEFT", reference) for engine, run in runs.items()]
    pairs += [(a, runs[a], b, runs[b]) for a, b in combinations(runs, 2)]
    for name_a, a, name_b, b in pairs:
        np.testing.assert_allclose(a.losses, b.losses, rtol=LOSS_RTOL, err_msg=f"losses: {name_a} vs {name_b}")
        worst, gap = update_gap(initial, a, b)
        assert gap < UPDATE_RTOL, f"{name_a} vs {name_b}: the updates of {worst} differ by {gap:.3%}"


def banking(small_banking, bundle):
    return load_dataset(DataConfig(small_banking["train"], label_column="category"), bundle)


def shakespeare_text(shakespeare, tmp_path):
    text = tmp_path / "s.txt"
    text.write_text(shakespeare.read_text()[:40_000])
    return text


@pytest.mark.parametrize("accum", [1, 2])
def test_engines_match_pytorch_peft_tiny(accum, tiny_bundle, tiny_portable_bundle, tiny_bert_dir, tiny_config,
                                         small_banking):
    bundles = {"ort-training": tiny_bundle, "portable": tiny_portable_bundle}
    data = banking(small_banking, tiny_bundle)
    assert_parity(*run_engines(bundles, from_hf_folder(tiny_bert_dir, tiny_config), tiny_config, data, 3e-3, accum))


@pytest.mark.parametrize("engines,accum", [(("ort-training",), 1), pytest.param(ENGINES, 1, marks=slow),
                                           pytest.param(ENGINES, 4, marks=slow)])
def test_engines_match_pytorch_peft_causal_lm(engines, accum, request, tiny_gpt2_dir, tiny_lm_config, shakespeare,
                                              tmp_path):
    fixtures = {"ort-training": "tiny_lm_bundle", "portable": "tiny_lm_portable_bundle"}
    bundles = {engine: request.getfixturevalue(fixtures[engine]) for engine in engines}
    data = load_dataset(DataConfig(shakespeare_text(shakespeare, tmp_path)), bundles[engines[0]])
    source = from_hf_folder(tiny_gpt2_dir, tiny_lm_config)
    assert_parity(*run_engines(bundles, source, tiny_lm_config, data, 3e-3, accum))


@slow
@pytest.mark.parametrize("accum", [1, 4])
def test_engines_match_pytorch_peft_distilbert(accum, export_once, tiny_distilbert_dir, tiny_config, small_banking):
    config = replace(tiny_config, adapter=AdapterConfig(target_modules=("q_lin", "v_lin")))
    bundles = {engine: export_once(tiny_distilbert_dir, replace(config, engine=engine)) for engine in ENGINES}
    data = banking(small_banking, bundles["portable"])
    assert_parity(*run_engines(bundles, from_hf_folder(tiny_distilbert_dir, config), config, data, 3e-3, accum))


@slow
@pytest.mark.parametrize("accum", [1, 4])
def test_engines_match_pytorch_peft_llama(accum, export_once, tiny_llama_dir, shakespeare, tmp_path):
    """A Llama-architecture decoder (grouped-query attention, RoPE, RMSNorm, SwiGLU), LoRA on every linear."""
    config = ExportConfig(task="causal-lm", max_length=64, adapter=AdapterConfig(rank=4, target_modules=LLAMA_TARGETS))
    bundles = {engine: export_once(tiny_llama_dir, replace(config, engine=engine)) for engine in ENGINES}
    assert bundles["portable"].manifest.adapter["target_modules"] == list(LLAMA_TARGETS)
    data = load_dataset(DataConfig(shakespeare_text(shakespeare, tmp_path)), bundles["portable"])
    assert_parity(*run_engines(bundles, from_hf_folder(tiny_llama_dir, config), config, data, 3e-3, accum))


@slow
def test_engines_match_pytorch_peft_minilm(export_once, banking_csv):
    """all-MiniLM-L6-v2 + LoRA(query, value) + head, both engines (the portable bundle is test_minilm's, exported
    once a session)."""
    from edgeft.datasets import banking77_labels
    from edgeft.demo import minilm_dir

    config = ExportConfig(labels=tuple(banking77_labels()))
    bundles = {engine: export_once(minilm_dir(), replace(config, engine=engine)) for engine in ENGINES}
    data = load_dataset(DataConfig(banking_csv["train"], label_column="category"), bundles["portable"])
    assert_parity(*run_engines(bundles, from_hf_folder(minilm_dir(), config), config,
                               data.subset(range(0, 10003, 10)), 3e-3))


def chat_file(shakespeare, tmp_path, n: int = 128):  # noqa: ANN001, ANN201
    """Tiny Shakespeare as chat turns: the user says one line, the assistant answers with the next."""
    import json

    lines = [line for line in shakespeare.read_text()[:60_000].splitlines() if line.strip()]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": lines[i]},
                                                     {"role": "assistant", "content": lines[i + 1]}]}) + "\n"
                            for i in range(n)))
    return path


@slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engines_match_pytorch_peft_on_chat_data(arch, shakespeare, tmp_path, request, export_once):
    """Llama- and Qwen2-architecture chat models (default targets: every attention and MLP projection; Qwen2's
    tied output layer frozen) on chat turns with the loss on the assistant's tokens only. The Llama and its
    bundles are the session's (``tiny_chat_llama_dir``), shared with the generation, DPO and simulation tests."""
    from edgeft.export.toy import tiny_qwen2

    if arch == "llama":
        folder = request.getfixturevalue("tiny_chat_llama_dir")
    else:
        folder = tiny_qwen2(tmp_path / arch, shakespeare.read_text()[:100_000], vocab_size=384, chat=True)
    config = ExportConfig(task="causal-lm", max_length=96, adapter=AdapterConfig(rank=4))
    bundles = {engine: export_once(folder, replace(config, engine=engine)) for engine in ENGINES}
    assert bundles["portable"].manifest.adapter["target_modules"] == list(LLAMA_TARGETS)
    data = load_dataset(DataConfig(chat_file(shakespeare, tmp_path)), bundles["portable"])
    masked = np.mean([(labels == -100).mean() for labels in data.labels])
    assert 0.5 < masked < 0.95, masked  # the system prompt and the user's line carry no loss
    assert_parity(*run_engines(bundles, from_hf_folder(folder, config), config, data, 3e-3))
