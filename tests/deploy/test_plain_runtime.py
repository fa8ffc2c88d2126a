"""A deployment package runs with the plain ``onnxruntime`` inference package, not only with the training build,
and computes the same logits there (issue 4).

The plain runtime cannot live beside onnxruntime-training-cpu (both own the ``onnxruntime`` import folder), so
it goes into a device virtualenv of its own on this Python (scripts/device_venv.py: edgeft's base dependencies
with the runtime swapped, and this checkout's edgeft), made once and kept in pytest's cache folder.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeft.data import DataConfig
from edgeft.deploy import DeployConfig, deploy
from edgeft.deploy.package import MODES
from edgeft.predict import Predictor

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXTRA = "runtime-check"  # the optional dependency in pyproject.toml that pins the plain runtime

# Largest |logit difference| allowed between the plain runtime and the training build, per mode (logits here are
# of size ~2). Measured on an AVX2 CPU (1.23.2 vs 1.19.2): none, int8 and int4 were bit-identical; fp16 differed
# by 1.7e-3 (its fp16 kernels changed; fp16 itself is 1.3e-3 off fp32); int8-static by 0.077: both runtimes
# fuse the QDQ graph into QLinearMatMul at their default optimisation level, but not identically (unfused,
# the two agree exactly), while the quantisation itself moves logits by ~0.4.
TOLERANCE = {"none": 1e-4, "fp16": 1e-2, "int8": 1e-3, "int8-static": 0.25, "int4": 1e-3}

# Runs in the plain runtime's virtualenv: loads each package with edgeft.predict.Predictor, reports what it
# computed, which runtime computed it and which third-party modules edgeft itself pulled in.
SCRIPT = """
import json, sys
import numpy, onnxruntime, tokenizers
before = {name.split(".")[0] for name in sys.modules}
from edgeft.predict import Predictor
job = json.load(sys.stdin)
packages = {}
for mode, path in job["packages"].items():
    predictor = Predictor(path)
    encoded = predictor.encode(job["texts"])
    packages[mode] = {"input_ids": encoded["input_ids"].tolist(), "logits": predictor.run(encoded).tolist(),
                      "providers": predictor.session.get_providers(), "predictions": predictor.predict(job["texts"])}
imported = {name.split(".")[0] for name in sys.modules} - before - set(sys.stdlib_module_names)
try:
    import onnxruntime.training
    training = True
except ImportError:
    training = False
json.dump({"version": onnxruntime.__version__, "file": onnxruntime.__file__, "training": training,
           "available_providers": onnxruntime.get_available_providers(), "imported_by_edgeft": sorted(imported),
           "packages": packages}, sys.stdout)
"""


def plain_version() -> str:
    """The plain onnxruntime version pyproject.toml's runtime-check extra pins (exactly)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [r for r in project["optional-dependencies"][EXTRA] if re.match(r"onnxruntime\s*([=<>!~;\[]|$)", r)]
    assert len(pins) == 1, f"expected one requirement on onnxruntime in the {EXTRA} extra, not {pins}"
    version = pins[0].partition("==")[2].strip()
    assert version, f"pyproject.toml's {EXTRA} extra must pin onnxruntime exactly (==), not {pins[0]!r}"
    return version


@pytest.fixture(scope="session")
def plain_runtime(device_venv) -> tuple[Path, str]:  # noqa: ANN001
    """(python of a device virtualenv on this Python holding the plain onnxruntime instead of the training
    build; the pinned version). Made once and kept in pytest's cache folder (``--cache-clear`` makes it again)."""
    version = plain_version()
    return device_venv(sys.executable, f"onnxruntime=={version}"), version


@pytest.fixture(scope="module")
def packages(tmp_path_factory, tiny_bert_dir, tiny_bundle, adapter, small_banking) -> dict[str, Path]:
    """A deployment package of the tiny BERT + trained adapter in every mode."""
    out = tmp_path_factory.mktemp("plain-packages")
    for mode in MODES:
        deploy(DeployConfig(model_dir=tiny_bert_dir, bundle=tiny_bundle.path, adapter=adapter, out=out / mode,
                            mode=mode, eval_data=DataConfig(small_banking["test"], label_column="category"),
                            accuracy_budget=100))
    return {mode: out / mode for mode in MODES}


@pytest.fixture(scope="module")
def texts(small_banking) -> list[str]:
    """Real queries of several lengths, one longer than the packages' max_length (truncated)."""
    with open(small_banking["test"], newline="") as fh:
        rows = [row["text"] for row in csv.DictReader(fh)][:6]
    return rows + ["card", "I was charged twice for the same coffee this morning, and then my card was declined "
                           "at the supermarket although there is plenty of money in my account; what is going on?"]


@pytest.fixture(scope="module")
def plain(plain_runtime, packages, texts, tmp_path_factory) -> dict:
    """What the plain runtime computed for every package (one subprocess in its virtualenv)."""
    python, _ = plain_runtime
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1")
    job = json.dumps({"packages": {mode: str(path) for mode, path in packages.items()}, "texts": texts})
    proc = subprocess.run([str(python), "-c", SCRIPT], input=job, capture_output=True, text=True, env=env,
                          cwd=tmp_path_factory.mktemp("plain-cwd"), timeout=300)
    assert proc.returncode == 0, f"the plain runtime failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def test_it_is_the_plain_inference_package(plain, plain_runtime):
    python, version = plain_runtime
    assert TOLERANCE.keys() == set(MODES), "every deployment mode needs a tolerance here"
    assert plain["version"] == version
    assert not plain["training"], "onnxruntime.training imports: this is a training build"
    assert Path(plain["file"]).is_relative_to(python.parent.parent)
    # edgeft.predict needs nothing beyond onnxruntime, tokenizers, numpy and the standard library
    assert plain["imported_by_edgeft"] == ["edgeft"]


@pytest.mark.parametrize("mode", MODES)
def test_package_computes_the_same_with_the_plain_runtime(plain, packages, texts, mode):
    got = plain["packages"][mode]
    assert got["providers"] == ["CPUExecutionProvider"]
    predictor = Predictor(packages[mode])
    encoded = predictor.encode(texts)
    np.testing.assert_array_equal(np.asarray(got["input_ids"]), encoded["input_ids"])
    expected = predictor.run(encoded)
    logits = np.asarray(got["logits"], dtype=np.float32)
    assert logits.shape == expected.shape == (len(texts), len(predictor.labels))
    diff = float(np.abs(logits - expected).max())
    print(f"{mode}: max |logit difference| plain {plain['version']} vs training build = {diff:.3g}")
    assert diff <= TOLERANCE[mode]
    # the label agrees wherever the logits leave no room for the tolerated difference to change it
    top2 = np.sort(expected, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * TOLERANCE[mode]
    labels = np.array([label for label, _ in got["predictions"]])
    expected_labels = np.array([label for label, _ in predictor.predict(texts)])
    np.testing.assert_array_equal(labels[clear], expected_labels[clear])
