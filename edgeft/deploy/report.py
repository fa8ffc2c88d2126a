"""Measure a deployment: size, accuracy and macro-F1 on held-out data, latency p50/p95 at batch 1 and 32."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edgeft.data import DataConfig
from edgeft.predict import Predictor
from edgeft.train.metrics import classification_metrics


def _latency(predictor: Predictor, texts: list[str], batch: int, repeats: int) -> dict[str, float]:
    sample = (texts * (batch // max(len(texts), 1) + 1))[:batch]
    encoded = predictor.encode(sample)
    predictor.run(encoded)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.run(encoded)
        times.append(time.perf_counter() - started)
    return {"p50_ms": float(np.percentile(times, 50) * 1000), "p95_ms": float(np.percentile(times, 95) * 1000)}


def _model_report(path: Path, package_dir: Path, texts: list[str], labels: list[str], threads: int) -> dict:
    predictor = Predictor(package_dir, model_file=path, threads=threads)
    report: dict = {"size_mb": round(path.stat().st_size / 1e6, 2)}
    if texts:
        index = {name: i for i, name in enumerate(predictor.labels)}
        truth = np.array([index.get(label, -1) for label in labels])
        predicted = np.concatenate([predictor.logits(texts[i: i + 64]).argmax(-1) for i in range(0, len(texts), 64)])
        keep = truth >= 0
        metrics = classification_metrics(truth[keep], predicted[keep])
        report.update({"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "examples": int(keep.sum())})
        report["latency_batch1"] = _latency(predictor, texts, 1, 50)
        report["latency_batch32"] = _latency(predictor, texts, 32, 10)
    return report


def measure(fp32: Path, deployed: Path, package_dir: Path, eval_data: DataConfig | None, threads: int) -> dict:
    """Report on the fp32 model and the deployed one (same package tokenizer and data, read once)."""
    texts: list[str] = []
    labels: list[str] = []
    if eval_data is not None:
        from edgeft.data import read_records

        rows = read_records(eval_data)
        texts = [str(r[eval_data.text_column]) for r in rows]
        labels = [str(r[eval_data.label_column]) for r in rows]
    report = {"fp32": _model_report(fp32, package_dir, texts, labels, threads),
              "deployed": _model_report(deployed, package_dir, texts, labels, threads), "threads": threads}
    report["size_ratio"] = round(report["deployed"]["size_mb"] / report["fp32"]["size_mb"], 3)
    if eval_data is not None:
        report["accuracy_loss_points"] = round(100 * (report["fp32"]["accuracy"] - report["deployed"]["accuracy"]), 2)
    return report


def write_report(out: Path, report: dict) -> None:
    """report.json and report.md in the package folder."""
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"# edgeft deployment report ({report['mode']})", "",
             f"Package is {'GOOD' if report['good'] else 'NOT GOOD: over the accuracy budget'}.", "",
             "| model | size | accuracy | macro-F1 | p50 / p95 batch 1 | p50 / p95 batch 32 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("fp32", "deployed"):
        r = report[name]
        acc = f"{r['accuracy']:.2%}" if "accuracy" in r else "n/a"
        f1 = f"{r['macro_f1']:.2%}" if "macro_f1" in r else "n/a"
        l1 = r.get("latency_batch1", {})
        l32 = r.get("latency_batch32", {})
        lat1 = f"{l1['p50_ms']:.1f} / {l1['p95_ms']:.1f} ms" if l1 else "n/a"
        lat32 = f"{l32['p50_ms']:.1f} / {l32['p95_ms']:.1f} ms" if l32 else "n/a"
        lines.append(f"| {name} | {r['size_mb']} MB | {acc} | {f1} | {lat1} | {lat32} |")
    lines += ["", f"Size ratio {report['size_ratio']}; accuracy budget {report['accuracy_budget_points']} points; "
              f"loss {report.get('accuracy_loss_points', 'n/a')} points; {report['threads']} threads."]
    if report.get("fixed_shape"):
        lines.append(f"Input shape fixed at batch x sequence = {report['fixed_shape'][0]} x {report['fixed_shape'][1]}.")
    if report.get("calibration"):
        lines.append(f"Calibrated on {report['calibration']}.")
    (out / "report.md").write_text("\n".join(lines) + "\n")
