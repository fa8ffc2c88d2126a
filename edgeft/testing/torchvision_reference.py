"""torchvision's transforms as a reference for edgeft.images, without installing torchvision into the environment.

The PyPI torchvision wheel's compiled ops are linked against the CUDA torch; beside export's CPU torch its full import
fails and it breaks transformers and PEFT. Its transforms are pure Python, so the pinned wheel (pyproject.toml's
``image-check`` extra) is installed once, without dependencies, into a folder of its own
(``.venv/torchvision-reference``, git-ignored) and its ``transforms`` package is loaded from there with
torchvision's ``__init__`` (which registers the ops) skipped. Used by tests/test_images.py and bench/vision.py.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REFERENCE_ROOT = REPO / ".venv" / "torchvision-reference"


class ReferenceUnavailable(RuntimeError):
    """The torchvision reference could not be installed (no network, no wheel for this platform)."""


def reference_pin() -> str:
    """The torchvision requirement of pyproject.toml's image-check extra (e.g. torchvision==0.28.0)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return next(r for r in extras["image-check"] if r.startswith("torchvision=="))


def torchvision_folder() -> Path:
    """torchvision's package folder: the installed one, else the pinned wheel installed once (pip, no
    dependencies) into ``REFERENCE_ROOT``; ``ReferenceUnavailable`` when pip cannot install it."""
    spec = importlib.util.find_spec("torchvision")
    if spec is not None and spec.origin:
        return Path(spec.origin).parent
    pin = reference_pin()
    target = REFERENCE_ROOT / pin.replace("==", "-")
    if not (target / "torchvision" / "transforms").is_dir():
        REFERENCE_ROOT.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=REFERENCE_ROOT, prefix=".staging-"))
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                               "--quiet", "--no-deps", "--target", str(staging), pin], capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            raise ReferenceUnavailable(f"the torchvision reference ({pin}) could not be installed: {tail}")
        if not target.exists():
            staging.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    return target / "torchvision"


def transforms() -> types.SimpleNamespace:
    """``T`` (torchvision.transforms) and ``F`` (torchvision.transforms.functional), loaded on their own: a stand-in
    ``torchvision`` package points at the folder, and is taken out of sys.modules again afterwards."""
    if "torchvision.transforms.functional" in sys.modules:  # a working torchvision already imported
        return types.SimpleNamespace(T=sys.modules["torchvision.transforms"],
                                     F=sys.modules["torchvision.transforms.functional"])
    folder = torchvision_folder()
    before = set(sys.modules)
    stand_in = types.ModuleType("torchvision")
    stand_in.__path__ = [str(folder)]
    sys.modules["torchvision"] = stand_in
    try:
        import torchvision.transforms as transforms_module
        import torchvision.transforms.functional as functional
    finally:
        for name in set(sys.modules) - before:
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
    return types.SimpleNamespace(T=transforms_module, F=functional)
