"""The device side never needs torch or transformers: train a bundle in a process where importing
either one fails."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


BLOCKER = textwrap.dedent("""
    import sys

    # What a device without these packages sees: `import torch` fails, find_spec("torch") is None.
    for name in ("torch", "transformers", "peft", "optimum", "sklearn"):
        sys.modules[name] = None
""")


def test_train_from_bundle_without_torch(tmp_path, tiny_bundle, small_banking):
    out = tmp_path / "adapter"
    script = BLOCKER + textwrap.dedent(f"""
        from edgeft.cli import main
        code = main(["train", {str(tiny_bundle.path)!r}, "--data", {str(small_banking["train"])!r},
                     "--test", {str(small_banking["test"])!r}, "--label-column", "category",
                     "--max-steps", "5", "--out", {str(out)!r}, "--no-progress"])
        assert not [m for m, v in sys.modules.items() if m.split(".")[0] in ("torch", "transformers") and v]
        sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "update.safetensors").is_file()
    assert (out / "peft" / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 5 and "accuracy" in metrics["test"]


def test_blocker_really_blocks():
    proc = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True)
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr
