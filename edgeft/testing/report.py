"""A simulation's outputs: history.json, rounds.csv, clients.csv, PNG plots (matplotlib) and report.md."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np


def records(history: dict) -> list[dict]:
    """The job's rounds; an asynchronous job's global versions as rounds (version v as round v: its updates as
    the round's clients, status "closed")."""
    if "versions" not in history:
        return history["rounds"]
    initial = [r for r in history["rounds"] if r["round"] == 0]
    return initial + [{"round": v["version"], "status": "closed", "seconds": None, "evaluation": v["evaluation"],
                       "clients": [{**u, "bytes_down": 0} for u in v["updates"]]} for v in history["versions"]]


def round_rows(history: dict) -> list[dict]:
    """One row per round (an asynchronous job: per global version): the global adapter's test metrics, wall time,
    bytes, mean client training loss."""
    rows = []
    for r in records(history):
        evaluation = r.get("evaluation") or {}
        losses = [c["metrics"].get("train_loss") for c in r["clients"] if "train_loss" in c["metrics"]]
        rows.append({"round": r["round"], "status": r["status"], "seconds": r.get("seconds"),
                     "test_accuracy": evaluation.get("accuracy"), "test_macro_f1": evaluation.get("macro_f1"),
                     "test_loss": evaluation.get("loss"), "test_perplexity": evaluation.get("perplexity"),
                     "test_preference_accuracy": evaluation.get("preference_accuracy"),
                     "clients": len(r["clients"]),
                     "mean_train_loss": float(np.mean(losses)) if losses else None,
                     "bytes_up": sum(c["bytes_up"] for c in r["clients"]),
                     "bytes_down": sum(c["bytes_down"] for c in r["clients"])})
    return rows


def client_rows(history: dict) -> list[dict]:
    return [{"round": r["round"], "device_id": c["device_id"], "n_examples": c["n_examples"],
             "train_loss": c["metrics"].get("train_loss"), "bytes_up": c["bytes_up"], "bytes_down": c["bytes_down"]}
            for r in records(history) for c in r["clients"]]


def _csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(summary: dict, rounds: list[dict], out: Path) -> dict[str, str]:
    """accuracy.png, bytes.png and label_skew.png from the summary and its ``round_rows``; returns their file
    names by subject."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, scale, label = _main_metric(rounds)
    rows = [r for r in rounds if r[f"test_{metric}"] is not None]
    files = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["round"] for r in rows], [scale * r[f"test_{metric}"] for r in rows], "o-",
            label="federated (global adapter)")
    if summary.get("centralised"):
        epochs = [e for e in summary["centralised"] if metric in e]
        per_round = summary["config"]["local_epochs"]
        ax.plot([e["epoch"] / per_round for e in epochs], [scale * e[metric] for e in epochs], "s--",
                label=f"centralised, same passes over the data")
    ax.set_xlabel("round (centralised: epochs / local epochs per round)")
    ax.set_ylabel(label)
    ax.set_title(f"{summary['config']['clients']} clients, partition {summary['config']['partition']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    files["accuracy"] = "accuracy.png"

    trained = [r for r in rounds if r["round"] > 0 or r["bytes_up"]]  # round 0 too when it was a statistics round
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.array([r["round"] for r in trained])
    ax.bar(x - 0.2, [r["bytes_down"] / 1e6 for r in trained], 0.4, label="down (tasks: global adapter)")
    ax.bar(x + 0.2, [r["bytes_up"] / 1e6 for r in trained], 0.4, label="up (updates)")
    ax.set_xlabel("round")
    ax.set_ylabel("MB, all clients")
    ax.set_xticks(x)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=120)
    plt.close(fig)
    files["bytes"] = "bytes.png"

    histogram = np.array(summary["partition"]["histogram"])
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.3 * len(histogram) + 1.5)))
    image = ax.imshow(histogram, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_title(f"examples per client and class ({summary['partition']['scheme']})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "label_skew.png", dpi=120)
    plt.close(fig)
    files["label_skew"] = "label_skew.png"
    return files


def _main_metric(rounds: list[dict]) -> tuple[str, float, str]:
    """What the report plots: test accuracy for classifiers, perplexity for causal LMs (metric, scale, axis label)."""
    if any(r["test_perplexity"] is not None for r in rounds):
        return "perplexity", 1.0, "test perplexity (masked tokens only)"
    if any(r["test_preference_accuracy"] is not None for r in rounds):  # DPO
        return "preference_accuracy", 100.0, "test preference accuracy (%)"
    return "accuracy", 100.0, "test accuracy (%)"


def _pct(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "n/a"


def _ranks_line(ranks: list[int] | None) -> str:
    """The report's note on mixed LoRA ranks (empty for one rank)."""
    if not ranks:
        return ""
    return (f" Mixed LoRA ranks: each client's largest rank cycles through {', '.join(map(str, ranks))}; updates are "
            "aggregated as the mean of their LoRA products, re-factorised to the job's rank.")


def _engines_line(engines: list[str] | None, pythons: list[str] | None) -> str:
    """One sentence on the training engines a mixed fleet served ('' for one engine, one runtime)."""
    if not engines or len(engines) < 2:
        return ""
    runtimes = f", the clients' agents cycling through the Pythons {', '.join(pythons)}" if pythons else ""
    return (f" Training engines: the job serves {', '.join(engines)}{runtimes}; each client trains the first it runs, "
            "and all updates are aggregated together.")


def write_outputs(out: Path, summary: dict) -> None:
    """Write history.json, rounds.csv, clients.csv, the plots and report.md into ``out``."""
    history = summary["history"]
    (out / "history.json").write_text(json.dumps(history, indent=2))
    rounds = round_rows(history)
    _csv(out / "rounds.csv", rounds)
    _csv(out / "clients.csv", client_rows(history))
    files = plot(summary, rounds, out)
    c = summary["config"]
    lines = [f"# edgeft simulation: {c['clients']} clients, {c['rounds']} rounds, partition {c['partition']}", "",
             f"Local training: {c['local_epochs']} epoch(s) a round, batch {c['batch_size']}, lr {c['learning_rate']}; "
             f"{c['concurrency']} agents training at once, {c['threads_per_agent']} thread(s) each. "
             f"Federated wall time {summary['federated_seconds']:.0f} s. Job status: {history['status']}"
             f"{': ' + history['message'] if history['message'] else ''}."
             f"{_ranks_line(c.get('client_ranks'))}{_engines_line(c.get('engines'), c.get('client_pythons'))}", "",
             "| round | test accuracy | macro-F1 | test loss | test perplexity | mean client train loss | wall time | "
             "MB down | MB up |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rounds:
        loss = f"{r['test_loss']:.3f}" if r["test_loss"] is not None else "n/a"
        ppl = f"{r['test_perplexity']:.2f}" if r["test_perplexity"] is not None else "n/a"
        train = f"{r['mean_train_loss']:.3f}" if r["mean_train_loss"] is not None else ""
        seconds = f"{r['seconds']:.0f} s" if r["seconds"] else ""
        lines.append(f"| {r['round']} | {_pct(r['test_accuracy'])} | {_pct(r['test_macro_f1'])} | {loss} | {ppl} | "
                     f"{train} | {seconds} | {r['bytes_down'] / 1e6:.2f} | {r['bytes_up'] / 1e6:.2f} |")
    lines += ["", f"Round 0 is the initial model. Each device also downloaded the bundle once "
              f"({summary['bundle_bytes'] / 1e6:.1f} MB)."]
    if summary.get("centralised") and "perplexity" in summary["centralised"][-1]:
        lines += ["", "Centralised baseline (all data in one place, the same number of passes):", "",
                  "| epoch | test loss | test perplexity |", "| ---: | ---: | ---: |"]
        lines += [f"| {e['epoch']} | {e['loss']:.3f} | {e['perplexity']:.2f} |" for e in summary["centralised"]]
    elif summary.get("centralised") and "accuracy" in summary["centralised"][-1]:
        lines += ["", "Centralised baseline (all data in one place, the same number of passes):", "",
                  "| epoch | test accuracy | macro-F1 |", "| ---: | ---: | ---: |"]
        lines += [f"| {e['epoch']} | {_pct(e['accuracy'])} | {_pct(e['macro_f1'])} |" for e in summary["centralised"]]
        last_fed = next((r["test_accuracy"] for r in reversed(rounds) if r["test_accuracy"] is not None), None)
        if last_fed is not None:
            gap = 100 * (summary["centralised"][-1]["accuracy"] - last_fed)
            lines += ["", f"Gap after the same passes over the data: {gap:.1f} points (centralised minus federated)."]
    parts = summary["partition"]
    lines += ["", f"![test {_main_metric(rounds)[0]} per round]({files['accuracy']})", "", f"![bytes per round]({files['bytes']})", "",
              "## Partition", "",
              f"Scheme {parts['scheme']}, seed {parts['seed']}. Examples per client: {parts['sizes']}. "
              f"Classes per client: {parts['classes_per_client']}. Full histogram in partition.json.", "",
              f"![label skew]({files['label_skew']})", "",
              "Files: history.json (everything the coordinator recorded), rounds.csv, clients.csv, partition.json; "
              f"the coordinator's state in {summary['state_dir']} (job `{summary['job']}`)."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
