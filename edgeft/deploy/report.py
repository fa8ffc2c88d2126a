"""Measure a deployment: size, accuracy and macro-F1 on held-out data, agreement with fp32, latency p50/p95 at
batch 1 and 32."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.predict import Predictor
from edgeft.train.metrics import classification_metrics

EVAL_BATCH = 64


@dataclass
class TextExamples:
    """Held-out texts and their label names, encoded by the package's own tokenizer."""

    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def truth(self, names: list[str]) -> np.ndarray | None:
        index = {name: i for i, name in enumerate(names)}
        return np.array([index.get(label, -1) for label in self.labels])

    def feed(self, predictor: Predictor, index: np.ndarray) -> dict[str, np.ndarray]:
        return predictor.encode([self.texts[i] for i in index])


@dataclass
class DatasetExamples:
    """Held-out examples of a model that does not read text (an ``edgeft.inputs`` dataset, read with the bundle's
    readers: images preprocessed as in evaluation, feature columns, arrays)."""

    dataset: object  # edgeft.inputs.ArrayDataset | ImageDataset
    classification: bool

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def truth(self, names: list[str]) -> np.ndarray | None:
        targets = np.asarray(self.dataset.targets)  # type: ignore[attr-defined]
        return targets if self.classification and targets.ndim == 1 else None

    def feed(self, predictor: Predictor, index: np.ndarray) -> dict[str, np.ndarray]:
        batch = self.dataset.collate(index)  # type: ignore[attr-defined]
        batch.pop("labels", None)
        return batch


def _latency(predictor: Predictor, examples: TextExamples | DatasetExamples, batch: int, repeats: int
             ) -> dict[str, float]:
    feed = examples.feed(predictor, np.arange(batch) % len(examples))
    predictor.run(feed)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.run(feed)
        times.append(time.perf_counter() - started)
    return {"p50_ms": float(np.percentile(times, 50) * 1000), "p95_ms": float(np.percentile(times, 95) * 1000)}


def _model_report(path: Path, package_dir: Path, examples: TextExamples | DatasetExamples | None, threads: int
                  ) -> tuple[dict, np.ndarray | None]:
    """The model's report and its logits on the examples."""
    predictor = Predictor(package_dir, model_file=path, threads=threads)
    size = path.stat().st_size
    report: dict = {"size_mb": round(size / 1e6, 3), "size_bytes": size}
    if not examples:
        return report, None
    chunks = [np.arange(i, min(i + EVAL_BATCH, len(examples))) for i in range(0, len(examples), EVAL_BATCH)]
    logits = np.concatenate([predictor.run(examples.feed(predictor, chunk)) for chunk in chunks])
    truth = examples.truth(predictor.labels)
    if truth is not None:
        keep = truth >= 0
        metrics = classification_metrics(truth[keep], logits.argmax(-1)[keep])
        report.update({"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "examples": int(keep.sum())})
    else:
        report["examples"] = len(examples)
    report["latency_batch1"] = _latency(predictor, examples, 1, 50)
    report["latency_batch32"] = _latency(predictor, examples, 32, 10)
    return report, logits


def measure(fp32: Path, deployed: Path, package_dir: Path, examples: TextExamples | DatasetExamples | None,
            threads: int) -> dict:
    """Report on the fp32 model and the deployed one (same package readers and examples)."""
    fp32_report, fp32_logits = _model_report(fp32, package_dir, examples, threads)
    deployed_report, deployed_logits = _model_report(deployed, package_dir, examples, threads)
    report = {"fp32": fp32_report, "deployed": deployed_report, "threads": threads}
    report["size_ratio"] = round(deployed_report["size_bytes"] / fp32_report["size_bytes"], 3)
    if fp32_logits is not None and deployed_logits is not None:
        report["max_abs_logit_difference"] = float(np.abs(fp32_logits - deployed_logits).max())
        if fp32_logits.ndim == 2:
            report["top1_agreement"] = float((fp32_logits.argmax(-1) == deployed_logits.argmax(-1)).mean())
    if "accuracy" in fp32_report:
        report["accuracy_loss_points"] = round(100 * (fp32_report["accuracy"] - deployed_report["accuracy"]), 2)
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
        lat1 = f"{l1['p50_ms']:.3g} / {l1['p95_ms']:.3g} ms" if l1 else "n/a"
        lat32 = f"{l32['p50_ms']:.3g} / {l32['p95_ms']:.3g} ms" if l32 else "n/a"
        lines.append(f"| {name} | {r['size_mb']} MB | {acc} | {f1} | {lat1} | {lat32} |")
    lines += ["", f"Size ratio {report['size_ratio']}; accuracy budget {report['accuracy_budget_points']} points; "
              f"loss {report.get('accuracy_loss_points', 'n/a')} points; {report['threads']} threads."]
    if "top1_agreement" in report:
        lines.append(f"Top-1 agreement with fp32 {report['top1_agreement']:.2%}; largest logit difference "
                     f"{report['max_abs_logit_difference']:.3g}.")
    if report.get("fixed_shape"):
        lines.append(f"Input shape fixed at {' x '.join(str(d) for d in report['fixed_shape'])} "
                     f"({'batch x sequence' if len(report['fixed_shape']) == 2 else 'batch'}).")
    if report.get("notes"):
        lines += [f"{note}" for note in report["notes"]]
    if report.get("calibration"):
        lines.append(f"Calibrated on {report['calibration']}.")
    (out / "report.md").write_text("\n".join(lines) + "\n")
