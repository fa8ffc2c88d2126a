"""A device installs what fits it (issue 14): `pip install edgeft` picks the ONNX Runtime training build where its
wheels exist and the plain onnxruntime everywhere else, never both; on Python 3.13 with the plain runtime (no
torch, no training build) a device trains a portable bundle and refuses an ort-training one clearly.

The device's virtualenv comes from scripts/device_venv.py (cached in pytest's cache folder, ``--cache-clear``
makes it again); edgeft goes into it as a wheel of this checkout, its dependencies resolved through
pyproject.toml's markers.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]

# onnxruntime-training-cpu 1.19.2's wheels on PyPI (checked): cp38-cp312 for macosx_11_0_universal2,
# manylinux_2_27_x86_64 and win_amd64; nothing for aarch64 Linux, Windows on ARM or CPython 3.13.
def training_wheel_exists(python: str, platform: str, machine: str) -> bool:
    if tuple(map(int, python.split("."))) > (3, 12):
        return False
    return platform == "darwin" or (platform in ("linux", "win32") and machine in ("x86_64", "AMD64"))


def test_markers_pick_exactly_one_runtime_where_its_wheels_exist():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    runtimes = [r for r in requirements if r.name.startswith("onnxruntime")]
    onnx = [r for r in requirements if r.name == "onnx"]
    assert {r.name for r in runtimes} == {"onnxruntime", "onnxruntime-training-cpu"}
    for python, platform, machine in itertools.product(
            ("3.10", "3.11", "3.12", "3.13", "3.14"), ("linux", "darwin", "win32", "freebsd14", "cygwin"),
            ("x86_64", "AMD64", "aarch64", "arm64", "ARM64", "armv7l", "i686", "ppc64le", "riscv64")):
        env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": platform,
               "platform_machine": machine}
        picked = [r for r in runtimes if r.marker.evaluate(env)]
        where = f"Python {python} on {platform}/{machine}"
        assert len(picked) == 1, f"{where}: the markers pick {[str(r) for r in picked]}; they must pick one"
        training = training_wheel_exists(python, platform, machine)
        assert picked[0].name == ("onnxruntime-training-cpu" if training else "onnxruntime"), where
        assert str(picked[0].specifier) == ("==1.19.2" if training else ">=1.19"), where
        (pin,) = [r for r in onnx if r.marker.evaluate(env)]
        # onnx 1.17.0 (IR 10, what ORT 1.19 reads) has no CPython 3.13 wheels; 1.18.0 is the first with them
        assert str(pin.specifier) == ("==1.17.0" if python in ("3.10", "3.11", "3.12") else ">=1.18"), where
    # the coordinator needs the training build: on 3.13 or aarch64 Linux its install stops, never mixes runtimes
    export = [Requirement(r) for r in project["optional-dependencies"]["export"]]
    assert [str(r) for r in export if r.name.startswith("onnxruntime")] == ["onnxruntime-training-cpu==1.19.2"]


def run_device(python: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python args`` as the device would: outside the checkout, nothing of this process's environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


INSPECT = """
import importlib.metadata as m, json, sys
import edgeft, onnxruntime
from edgeft.train.engines import available_engines
found = {}
for name in ("torch", "transformers", "onnxruntime.training"):
    try:
        __import__(name)
        found[name] = True
    except ImportError:
        found[name] = False
print(json.dumps({"python": list(sys.version_info[:2]), "edgeft": edgeft.__file__, "ort": onnxruntime.__version__,
                  "engines": available_engines(), "importable": found,
                  "distributions": sorted({d.metadata["Name"].lower() for d in m.distributions()})}))
"""


@pytest.mark.slow
def test_device_venv_is_a_plain_python_313_install(device_python, device_runtime_version, tmp_path):
    proc = run_device(device_python, ["-c", INSPECT], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got["python"] == [3, 13]
    assert got["ort"] == device_runtime_version
    assert got["importable"] == {"torch": False, "transformers": False, "onnxruntime.training": False}
    assert got["engines"] == ["portable"]
    # edgeft is the installed package, not this checkout
    assert Path(got["edgeft"]).is_relative_to(device_python.parent.parent)
    assert not {"torch", "transformers", "onnxruntime-training-cpu", "onnxruntime-training"} & set(got["distributions"])
    # pip resolved edgeft's own dependencies: the markers chose the plain runtime on 3.13
    record = json.loads((device_python.parent.parent / "device-venv.json").read_text())
    assert (record["mode"], record["markers_pick"]) == ("markers", "onnxruntime")


@pytest.fixture(scope="module")
def portable_bundle(tiny_portable_bundle) -> Path:
    """The tiny BERT exported for the portable engine (standard ONNX training step): the session's
    ``tiny_portable_bundle``, exported once."""
    return tiny_portable_bundle.path


@pytest.mark.slow
def test_python_313_device_trains_a_portable_bundle(device_python, device_runtime_version, portable_bundle, small_banking,
                                                   tmp_path):
    out = tmp_path / "adapter"
    check = run_device(device_python, ["-c", "import sys; from edgeft.bundle import load_bundle, check_bundle; "
                                             "check_bundle(load_bundle(sys.argv[1]))", str(portable_bundle)], tmp_path)
    assert check.returncode == 0, f"the device's onnx.checker refuses the bundle:\n{check.stderr[-3000:]}"
    proc = run_device(device_python, ["-m", "edgeft.cli", "train", str(portable_bundle), "--data",
                                      str(small_banking["train"]), "--label-column", "category", "--epochs", "3",
                                      "--out", str(out), "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "portable engine" in output and f"onnxruntime {device_runtime_version}" in output, output
    history = json.loads((out / "metrics.json").read_text())["history"]
    losses = [record["train_loss"] for record in history]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert (out / "update.safetensors").is_file()


@pytest.mark.slow
def test_python_313_device_refuses_an_ort_training_bundle(device_python, device_runtime_version, tiny_bundle, small_banking,
                                                         tmp_path):
    out = tmp_path / "adapter"
    proc = run_device(device_python, ["-m", "edgeft.cli", "train", str(tiny_bundle.path), "--data",
                                      str(small_banking["train"]), "--label-column", "category", "--out", str(out),
                                      "--no-progress"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1, proc.stderr
    assert "'ort-training' engine" in errors[0] and f"onnxruntime {device_runtime_version}" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
