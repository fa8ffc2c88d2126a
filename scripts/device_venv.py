"""A virtualenv holding only what a device installs (``pip install edgeft``, no extras), with a chosen Python and
ONNX Runtime: made once, cached, and refreshed with this checkout's edgeft whenever its sources change.

    python scripts/device_venv.py [--python python3.13] [--runtime onnxruntime==1.32.0 | --runtime markers] [--root DIR]

prints the virtualenv's python. Tests and benchmarks use ``device_venv()`` (import this file from scripts/).

edgeft goes in as a wheel built from a copy of this checkout (the checkout itself gets no build/ or egg-info).
When the base dependencies' environment markers pick the requested runtime for that Python (onnxruntime on
3.13), pip resolves edgeft with its dependencies and the runtime pin together: exactly what a device gets. When
they pick the other one (onnxruntime-training-cpu on x86-64 CPython 3.10-3.12, asked for a plain onnxruntime),
the runtime requirements are swapped: the other base dependencies and the requested runtime, then edgeft
without dependencies, so the two runtimes (which own the same ``onnxruntime`` folder) never meet. Either way
the result is checked: one runtime, no coordinator package (torch, transformers, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

try:
    from packaging.requirements import Requirement
except ModuleNotFoundError:  # pip always carries it
    from pip._vendor.packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
# Distributions that install the `onnxruntime` import folder: a device venv holds exactly one of them.
RUNTIMES = ("onnxruntime", "onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime-gpu")
# Coordinator packages (the export extra): a device never has them.
COORDINATOR = ("torch", "transformers", "peft", "optimum", "optimum-onnx", "onnxscript")
# pip's words when the package index cannot be reached (then callers may skip; any other failure is an error).
NETWORK_ERRORS = ("NewConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "Failed to establish a new "
                  "connection", "Temporary failure in name resolution", "Name or service not known",
                  "Network is unreachable", "ProxyError", "Max retries exceeded")
PIP = ("-m", "pip", "--disable-pip-version-check", "--no-input")
INSTALL = (*PIP, "install", "--retries", "2", "--timeout", "60")

# Run by the target Python: the values PEP 508 markers are evaluated against.
_MARKER_ENV = """
import json, os, platform, sys
v = sys.implementation.version
print(json.dumps({"implementation_name": sys.implementation.name, "os_name": os.name,
    "implementation_version": f"{v.major}.{v.minor}.{v.micro}", "platform_machine": platform.machine(),
    "platform_python_implementation": platform.python_implementation(), "platform_release": platform.release(),
    "platform_system": platform.system(), "platform_version": platform.version(),
    "python_full_version": platform.python_version(), "python_version": "%d.%d" % sys.version_info[:2],
    "sys_platform": sys.platform, "executable": sys.executable}))
"""
# Run in the finished venv: what is installed there.
_INVENTORY = """
import json, importlib.metadata as m
print(json.dumps(sorted({d.metadata["Name"].lower().replace("_", "-"): d.version for d in m.distributions()}.items())))
"""


class DeviceVenvError(RuntimeError):
    """The device virtualenv could not be made."""


class IndexUnreachable(DeviceVenvError):
    """pip could not reach the package index (no network): callers may skip rather than fail."""


def device_venv(root: Path, python: str = "python3.13", runtime: str | None = "onnxruntime==1.32.0") -> Path:
    """The python of a virtualenv under ``root`` holding this checkout's edgeft, its base (device) dependencies
    and ``runtime`` (a requirement on one of RUNTIMES; None: whichever the base markers pick), on ``python`` (a
    command such as ``python3.13``, found through pyenv too, or a path). Cached per (Python, runtime, base
    dependencies); edgeft itself is reinstalled when the checkout's sources change. Raises ``IndexUnreachable``
    without network, ``DeviceVenvError`` otherwise."""
    exe, env = _interpreter(python)
    dependencies = _project()["dependencies"]
    picked = _picked_runtime(dependencies, env)
    wanted = Requirement(runtime) if runtime else None
    if wanted is not None and _name(wanted.name) not in RUNTIMES:
        raise DeviceVenvError(f"runtime {runtime!r} is not an ONNX Runtime distribution ({', '.join(RUNTIMES)})")
    key = hashlib.sha256(json.dumps([env["python_full_version"], str(exe), runtime, dependencies]).encode())
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", runtime or "markers").strip("-")
    venv = Path(root) / f"device-py{env['python_version']}-{slug}-{key.hexdigest()[:10]}"
    venv_python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    record_file, source = venv / "device-venv.json", _source_digest()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _locked(venv.with_name(venv.name + ".lock")):
        record = json.loads(record_file.read_text()) if record_file.is_file() and venv_python.is_file() else None
        if record is not None and record["source"] == source:
            return venv_python
        with tempfile.TemporaryDirectory(prefix="edgeft-wheel-") as tmp:
            wheel = _build_wheel(Path(tmp))
            if record is not None:  # same dependencies, new edgeft sources
                _run([str(venv_python), *INSTALL, "--no-deps", "--force-reinstall", str(wheel)])
                record["source"] = source
            else:
                record = _create(venv, venv_python, exe, wheel, wanted, picked, dependencies)
                record.update(source=source, python=env["python_full_version"], requested=runtime)
        record_file.write_text(json.dumps(record, indent=2) + "\n")
    return venv_python


def _create(venv: Path, venv_python: Path, exe: Path, wheel: Path, wanted, picked: str,  # noqa: ANN001
            dependencies: list[str]) -> dict:
    """Make the venv and install into it; returns what went in (mode, runtime, the inventory)."""
    _run([str(exe), "-m", "venv", "--clear", str(venv)])
    if wanted is None or _name(wanted.name) == picked:
        mode = "markers"  # pip resolves edgeft's own dependencies, markers included
        _run([str(venv_python), *INSTALL, str(wheel), *([str(wanted)] if wanted else [])])
    else:
        mode = "swapped"
        others = [d for d in dependencies if _name(Requirement(d).name) not in RUNTIMES]
        _run([str(venv_python), *INSTALL, str(wanted), *others])
        _run([str(venv_python), *INSTALL, "--no-deps", str(wheel)])
    inventory = dict(json.loads(_run([str(venv_python), "-c", _INVENTORY])))
    runtimes = sorted(name for name in inventory if name in RUNTIMES)
    expected = _name(wanted.name) if wanted else picked
    if runtimes != [expected]:
        raise DeviceVenvError(f"{venv} should hold the runtime {expected} alone; it holds {runtimes}")
    coordinator = sorted(name for name in inventory if name in COORDINATOR)
    if coordinator:
        raise DeviceVenvError(f"{venv} is a device install but holds coordinator packages {coordinator}")
    return {"mode": mode, "markers_pick": picked, "runtime": f"{expected}=={inventory[expected]}",
            "installed": inventory}


def find_python(python: str) -> Path:
    """The interpreter ``python`` names: a path, a command on PATH, or (when a pyenv shim does not answer
    because that version is not selected) the newest pyenv version that has it."""
    candidates = [python] if os.sep in python else [shutil.which(python)]
    if os.sep not in python:
        pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
        found = sorted(pyenv.glob(f"*/bin/{python}"), key=lambda p: [int(x) if x.isdigit() else -1 for x in
                                                                      re.split(r"[.\-]", p.parent.parent.name)])
        candidates += [str(p) for p in reversed(found)]
    for candidate in filter(None, candidates):
        proc = subprocess.run([candidate, "-c", "import sys; print(sys.executable)"], capture_output=True,
                              text=True, env=_clean_env())
        if proc.returncode == 0 and proc.stdout.strip():
            return Path(proc.stdout.strip())
    raise DeviceVenvError(f"no working {python} here (looked on PATH and under pyenv's versions)")


def _interpreter(python: str) -> tuple[Path, dict]:
    exe = find_python(python)
    env = json.loads(_run([str(exe), "-c", _MARKER_ENV]))
    return Path(env.pop("executable")), env


def _picked_runtime(dependencies: list[str], env: dict) -> str:
    """The one runtime distribution the base dependencies' markers select for ``env``."""
    picked = [_name(r.name) for r in map(Requirement, dependencies)
              if _name(r.name) in RUNTIMES and (r.marker is None or r.marker.evaluate(env))]
    if len(picked) != 1:
        raise DeviceVenvError(f"pyproject.toml's markers pick {picked or 'no runtime'} for Python "
                              f"{env['python_version']} on {env['sys_platform']}/{env['platform_machine']}: "
                              "they must pick exactly one")
    return picked[0]


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_sources() -> list[Path]:
    """The checkout's files a wheel is built from: pyproject.toml, README.md, licences, the package folders."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = sorted({Path(p).parts[0] for p in setuptools["package-dir"].values()})
    files = [REPO / "pyproject.toml", REPO / "README.md", *sorted(REPO.glob("LICEN[CS]E*"))]
    for folder in folders:
        files += sorted(p for p in (REPO / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts
                        and not p.name.endswith((".pyc", ".egg-info")))
    return [f for f in files if f.is_file()]


def _source_digest() -> str:
    digest = hashlib.sha256()
    for path in _wheel_sources():
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _build_wheel(tmp: Path) -> Path:
    """A wheel of this checkout, built from a copy of its sources in ``tmp``."""
    copy = tmp / "src"
    for path in _wheel_sources():
        target = copy / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    # fast when this interpreter already has the build backend; else pip fetches it (build isolation)
    isolation = ["--no-build-isolation"] if _has_setuptools(77) else []
    _run([sys.executable, *PIP, "wheel", "--no-deps", *isolation, "-w", str(tmp / "dist"), str(copy)])
    wheels = sorted((tmp / "dist").glob("edgeft-*.whl"))
    if len(wheels) != 1:
        raise DeviceVenvError(f"building edgeft's wheel left {wheels}")
    return wheels[0]


def _has_setuptools(major: int) -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= major


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
                                                             "PYTHONSTARTUP", "PIP_REQUIRE_VIRTUALENV")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), timeout=1200)
    output = proc.stdout + proc.stderr
    if proc.returncode:
        if cmd[1:3] == ["-m", "pip"] and any(marker in output for marker in NETWORK_ERRORS):
            lines = output.strip().splitlines()
            raise IndexUnreachable(f"pip cannot reach the package index ({lines[-1] if lines else 'no output'})")
        raise DeviceVenvError(f"{' '.join(cmd)} failed (exit code {proc.returncode}):\n{output[-3000:]}")
    return proc.stdout


@contextlib.contextmanager
def _locked(path: Path):  # noqa: ANN202
    """Hold an exclusive lock on ``path`` (two processes must not build one venv at once)."""
    with open(path, "a") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="python3.13", help="interpreter command or path (default python3.13)")
    parser.add_argument("--runtime", default="onnxruntime==1.32.0",
                        help="runtime requirement, or 'markers' for what pyproject.toml's markers pick")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeft" / "device-venvs"
    parser.add_argument("--root", type=Path, default=cache, help=f"folder of the cached venvs (default {cache})")
    args = parser.parse_args(argv)
    try:
        print(device_venv(args.root, args.python, None if args.runtime == "markers" else args.runtime))
    except DeviceVenvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
