"""The command line: export then train end to end; bad input is a one-line error and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

from edgeft.cli import main


def test_export_and_train_from_the_command_line(tmp_path, tiny_bert_dir, small_banking, capsys):
    labels = tmp_path / "labels.json"
    from edgeft.datasets import banking77_labels

    LABELS = tuple(banking77_labels())

    labels.write_text(json.dumps(list(LABELS)))
    bundle = tmp_path / "bundle"
    assert main(["export", str(tiny_bert_dir), "--out", str(bundle), "--labels", str(labels),
                 "--rank", "4", "--max-length", "32"]) == 0
    assert "trainable tensors" in capsys.readouterr().out
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["adapter"]["rank"] == 4 and manifest["tokenizer"]["max_length"] == 32
    out = tmp_path / "run"
    assert main(["train", str(bundle), "--data", str(small_banking["train"]), "--label-column", "category",
                 "--epochs", "2", "--val-fraction", "0.2", "--early-stopping-patience", "3",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert '"epoch": 2' in printed and "adapter written to" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and "val_macro_f1" in metrics["history"][0]


def test_errors_are_one_line_with_exit_code_2(tmp_path, tiny_bundle, small_banking, capsys):
    code = main(["train", str(tiny_bundle.path), "--data", str(small_banking["train"]), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "error: " in err and "no column 'label'" in err and "Traceback" not in err
    code = main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "b"), "--labels", "a,b"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "edgeft.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "export" in proc.stdout and "train" in proc.stdout


def test_the_default_engine_is_portable():
    """The default training engine, chosen on the evidence in docs/engines.md and docs/performance.md."""
    from edgeft.cli import build_parser
    from edgeft.config import ExportConfig

    config = ExportConfig(task="regression")
    assert config.engine == "portable" and config.onnx_opset == 18
    args = build_parser().parse_args(["export", "model", "--out", "b"])
    assert args.engine == "portable"


def test_a_bad_flag_value_is_a_config_error_not_a_crash(tmp_path, capsys):
    """`edgeft simulate --client-ranks 8,x` names the flag and its value (it once died with a NameError)."""
    code = main(["simulate", "--client-ranks", "8,x", "--bundle", str(tmp_path / "bundle"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "NameError" not in err
    assert "edgeft simulate: error: invalid --client-ranks '8,x': comma-separated whole numbers" in err
    assert not (tmp_path / "state").exists()  # refused before any work


def test_the_device_agent_runs_as_a_module(tmp_path):
    """`python -m edgeft.client` is `edgeft client`: the same flags, errors as one line with exit code 2."""
    proc = subprocess.run([sys.executable, "-m", "edgeft.client", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--server" in proc.stdout and "--token-file" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "edgeft.client", "--server", "127.0.0.1:1", "--data",
                           str(tmp_path / "missing.csv"), "--insecure"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "edgeft client: error: data file" in proc.stderr and "Traceback" not in proc.stderr


def test_train_reads_a_label_map(tmp_path, tiny_bundle, small_banking):
    """--label-map: raw label values renamed to the bundle's labels before training (a JSON object)."""
    import csv


    rows = list(csv.DictReader(open(small_banking["train"], newline="", encoding="utf-8")))[:40]
    renamed = tmp_path / "renamed.csv"
    with open(renamed, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "category": "raw-" + r["category"]} for r in rows)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"raw-" + r["category"]: r["category"] for r in rows}))
    code = main(["train", str(tiny_bundle.path), "--data", str(renamed), "--label-column", "category",
                 "--label-map", str(mapping), "--max-steps", "1", "--val-fraction", "0", "--out",
                 str(tmp_path / "out"), "--no-progress"])
    assert code == 0 and (tmp_path / "out" / "update.safetensors").is_file()


def test_gradient_checkpointing_from_export_to_a_federated_simulation(tmp_path, shakespeare, capsys):
    """`edgeft export --gradient-checkpointing` then `edgeft simulate`: the devices train the layer-by-layer bundle,
    the coordinator evaluates it each round, and the summary names the test perplexity (not an accuracy)."""
    from edgeft.export.toy import tiny_llama

    folder = tiny_llama(tmp_path / "llama", shakespeare.read_text()[:30_000], vocab_size=300)
    bundle = tmp_path / "bundle"
    assert main(["export", str(folder), "--task", "causal-lm", "--out", str(bundle), "--rank", "4",
                 "--max-length", "48", "--gradient-checkpointing"]) == 0
    assert json.loads((bundle / "manifest.json").read_text())["segmented"]["layers"] == 2
    paragraphs = [p for p in shakespeare.read_text()[:40_000].split("\n\n") if p.strip()]
    for name, rows in (("train.jsonl", paragraphs[:48]), ("test.jsonl", paragraphs[48:64])):
        (tmp_path / name).write_text("".join(json.dumps({"text": p}) + "\n" for p in rows))
    capsys.readouterr()
    assert main(["simulate", "--bundle", str(bundle), "--data", str(tmp_path / "train.jsonl"), "--test-data",
                 str(tmp_path / "test.jsonl"), "--clients", "2", "--rounds", "2", "--no-baseline", "--batch-size", "8",
                 "--lr", "1e-2", "--out", str(tmp_path / "sim")]) == 0
    assert "final test perplexity" in capsys.readouterr().out
    rounds = (tmp_path / "sim" / "rounds.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rounds[1:]] == ["initial", "closed", "closed"]
    losses = [float(r.split(",")[5]) for r in rounds[1:]]
    assert losses[-1] < losses[0]
