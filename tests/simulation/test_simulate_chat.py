"""A federated causal-LM job on chat data: a tiny chat Llama (ChatML template) on Tiny Shakespeare chat turns,
spread iid over 3 simulated devices, LoRA on every attention and MLP projection, the loss on the assistant's tokens
only; the coordinator evaluates the masked loss and perplexity every round and the report shows them."""

from __future__ import annotations

import json

import pytest

from edgeft.config import AdapterConfig, ExportConfig, TrainConfig
from edgeft.data import DataConfig
from edgeft.errors import ConfigError
from edgeft.testing.runner import SimulationConfig, run_simulation


def chat_rows(shakespeare, start: int, n: int) -> list[dict]:  # noqa: ANN001
    lines = [line for line in shakespeare.read_text()[:80_000].splitlines() if line.strip()]
    return [{"messages": [{"role": "user", "content": lines[i]}, {"role": "assistant", "content": lines[i + 1]}]}
            for i in range(start, start + n)]


def test_a_chat_model_learns_across_three_simulated_devices(tmp_path, shakespeare, tiny_chat_llama_dir, export_once):
    bundle = export_once(tiny_chat_llama_dir, ExportConfig(task="causal-lm", max_length=96,
                                                           adapter=AdapterConfig(rank=4), engine="ort-training"))
    for name, rows in (("train", chat_rows(shakespeare, 0, 120)), ("test", chat_rows(shakespeare, 500, 40))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_simulation(SimulationConfig(
        out=tmp_path / "sim", train=DataConfig(tmp_path / "train.jsonl"), test=DataConfig(tmp_path / "test.jsonl"),
        bundle=bundle.path, clients=3, rounds=2, partition="iid", head_init="none", baseline=False,
        local=TrainConfig(epochs=2, batch_size=8, learning_rate=1e-2, progress=False)))
    assert sorted(p.name for p in (tmp_path / "sim" / "clients").iterdir()) == [
        "client-000.jsonl", "client-001.jsonl", "client-002.jsonl"]
    assert sum(summary["partition"]["sizes"]) == 120
    rounds = summary["history"]["rounds"]
    assert [r["status"] for r in rounds if r["round"] > 0] == ["closed", "closed"]
    perplexity = [r["evaluation"]["perplexity"] for r in rounds]
    assert perplexity[-1] < perplexity[0], perplexity  # the global adapter learns the assistant's lines
    report = (tmp_path / "sim" / "report.md").read_text()
    assert "test perplexity" in report and "![test perplexity per round]" in report


def test_a_causal_lm_job_refuses_label_partitions_and_one_document(tmp_path, shakespeare, tiny_lm_bundle):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in ["a b", "c d"] * 5))
    for train, partition, message in ((DataConfig(tmp_path / "rows.jsonl"), "dirichlet:0.5", "use --partition iid"),
                                      (DataConfig(shakespeare), "iid", "one plain-text document")):
        with pytest.raises(ConfigError, match=message):
            run_simulation(SimulationConfig(out=tmp_path / "sim", train=train, bundle=tiny_lm_bundle.path, clients=2,
                                            rounds=1, partition=partition, head_init="none", baseline=False,
                                            local=TrainConfig(progress=False)))


def test_a_dpo_job_reports_preference_accuracy_per_round(tmp_path, shakespeare, tiny_chat_llama_dir, export_once):
    bundle = export_once(tiny_chat_llama_dir, ExportConfig(task="causal-lm", loss="dpo", max_length=192,
                                                           adapter=AdapterConfig(rank=4), engine="ort-training"))
    lines = [line for line in shakespeare.read_text()[:20_000].splitlines() if line.strip()]
    rows = [{"prompt": lines[i], "chosen": lines[i + 1], "rejected": "no no no no"} for i in range(40)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_simulation(SimulationConfig(
        out=tmp_path / "sim", train=DataConfig(tmp_path / "prefs.jsonl"), test=DataConfig(tmp_path / "prefs.jsonl"),
        bundle=bundle.path, clients=2, rounds=2, partition="iid", head_init="none", baseline=False,
        local=TrainConfig(epochs=2, batch_size=8, learning_rate=1e-2, progress=False)))
    evaluations = [r["evaluation"] for r in summary["history"]["rounds"]]
    assert evaluations[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # round 0: the base is the reference
    assert evaluations[-1]["preference_accuracy"] > 0.5 and evaluations[-1]["reward_margin"] > 0, evaluations
    assert "![test preference_accuracy per round]" in (tmp_path / "sim" / "report.md").read_text()
