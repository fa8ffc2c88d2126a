"""Test tooling's agent processes: started as a device runs them (`python -m edgeft.client`, attackers
`python -m edgeft.testing.byzantine`), with torch, transformers and peft unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from edgeft.config import TrainConfig
from edgeft.testing.agents import NO_TORCH, AgentSpec
from edgeft.testing.byzantine import Attack, Corruption
from edgeft.wire import Task


def test_agents_are_modules_with_flags_not_code_strings():
    honest = AgentSpec(("--server", "127.0.0.1:1", "--data", "d.csv"))
    assert honest.command() == [sys.executable, "-m", "edgeft.client", "--server", "127.0.0.1:1", "--data", "d.csv"]
    attacker = AgentSpec(("--server", "s"), attack="scaled:10", seed=3)
    assert attacker.command()[1:] == ["-m", "edgeft.testing.byzantine", "--attack", "scaled:10", "--seed", "3",
                                      "--server", "s"]


def test_a_simulated_device_cannot_import_torch_but_runs_the_agent():
    script = textwrap.dedent("""
        import importlib, json
        blocked = {}
        for name in ("torch", "transformers", "peft"):
            try:
                importlib.import_module(name)
                blocked[name] = False
            except ModuleNotFoundError:
                blocked[name] = True
        import edgeft.client.agent, edgeft.testing.byzantine  # the agents' own code imports fine
        print(json.dumps(blocked))
    """)
    env = AgentSpec(()).environment()
    assert env["PYTHONPATH"].split(":")[0] == str(NO_TORCH)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == '{"torch": true, "transformers": true, "peft": true}'


def test_an_attackers_tamper_hook_corrupts_trained_updates_only():
    g, x = {"w": np.array([1.0, 2.0], np.float32)}, {"w": np.array([1.5, 1.0], np.float32)}
    tamper = Corruption(Attack.parse("sign_flip"))
    task = Task("j", 1, "d", TrainConfig(), g)
    np.testing.assert_allclose(tamper(x, task)["w"], [0.5, 3.0])
    statistics = Task("j", 0, "d", TrainConfig(), g, kind="statistics")
    assert tamper(x, statistics) is x


def test_an_attacker_with_a_bad_attack_stops_with_a_one_line_error(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhi,a\n")
    proc = subprocess.run([sys.executable, "-m", "edgeft.testing.byzantine", "--attack", "flip", "--server",
                           "127.0.0.1:1", "--data", str(data), "--insecure"], capture_output=True, text=True,
                          env=AgentSpec(()).environment(), timeout=120)
    assert proc.returncode == 2 and "invalid attack='flip'" in proc.stderr and "Traceback" not in proc.stderr
