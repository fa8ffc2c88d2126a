"""The fault-injection figures: runs tests/server/test_fault_injection.py (real processes; the tiny BERT bundle)
and reports what each scenario measured: clients killed (30% of 10, mid-upload included), coordinator SIGKILLs
survived (20, mid-write included), corrupt state files detected, replays counted once, fuzzed messages rejected
per category with the coordinator's RSS before and after.

    python bench/faults.py [--quick] [--work runs/faults]
    python bench/faults.py --replicas 2 [--kills 20] [--work runs/faults-replicas]

--quick runs only the quick variants (3 clients, 3 coordinator kills; the 1000 fuzzed messages always), as the
default test suite does; without it the full-size ones too (about 5 minutes on 2 cores).
--replicas 2 runs tests/server/test_replicas.py's kill scenario instead: two coordinator processes on one PostgreSQL
database and one SeaweedFS bucket (both started by the test), three agents given both addresses, the replicas
SIGKILLed in turn --kills times (from outside, inside a database commit, right after a blob write) over 2 rounds per
kill (about 90 s for 20 on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick variants only")
    parser.add_argument("--work", default="runs/faults", help="folder for the report and pytest's output")
    parser.add_argument("--replicas", type=int, choices=[1, 2], default=1,
                        help="2: SIGKILL one of two coordinator replicas on PostgreSQL + S3 (test_replicas.py)")
    parser.add_argument("--kills", type=int, default=20, help="with --replicas 2: how many SIGKILLs (default 20)")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = work / "fault_report.json"
    report.unlink(missing_ok=True)
    started = time.monotonic()
    selection = "not slow" if args.quick else "slow or not slow"
    tests = ["tests/server/test_fault_injection.py"] if args.replicas == 1 else [
        "tests/server/test_replicas.py", "-k", "sigkilled"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", selection,
                           "--basetemp", str(work / "pytest"), *tests], cwd=ROOT,
                          env={**os.environ, "EDGEFT_FAULT_REPORT": str(report), "EDGEFT_REPLICA_KILLS": str(args.kills)},
                          capture_output=True, text=True)
    (work / "pytest.log").write_text(proc.stdout + proc.stderr)
    figures = json.loads(report.read_text()) if report.is_file() else {}
    result = {"passed": proc.returncode == 0, "seconds": round(time.monotonic() - started, 1),
              "variants": "quick" if args.quick else "full", "replicas": args.replicas, "scenarios": figures}
    emit(result, summary(figures, proc.returncode == 0))
    sys.exit(proc.returncode)


def summary(figures: dict, passed: bool) -> str:
    parts = ["faults: " + ("all scenarios passed" if passed else "FAILED (see pytest.log)")]
    kills = figures.get("coordinator_killed_20") or figures.get("coordinator_killed_quick")
    if kills:
        kinds = ", ".join(f"{v} {k}" for k, v in kills["by_kind"].items())
        parts.append(f"coordinator SIGKILLed {kills['kills']}x ({kinds}), resumed, {kills['rounds']} rounds x "
                     f"{kills['updates_per_round']} updates, none twice")
    replicas = next((v for k, v in figures.items() if k.startswith("replicas_killed_")), None)
    if replicas:
        kinds = ", ".join(f"{v} {k}" for k, v in replicas["by_kind"].items())
        parts.append(f"one of 2 replicas SIGKILLed {replicas['kills']}x in turn ({kinds}; "
                     f"{replicas['kills_with_a_round_open']} with a round open), the other carried {replicas['rounds']} "
                     f"rounds x {replicas['updates_per_round']} updates (closed per replica: "
                     f"{replicas['rounds_closed_per_replica']}), none twice, every adapter evaluated")
    clients = figures.get("clients_killed_30pct_completes") or figures.get("clients_killed_quick")
    if clients:
        parts.append(f"{sum(clients['killed'].values())}/{clients['clients']} clients killed: round "
                     f"{clients['job']} with {clients['updates_stored']}")
    aborted = figures.get("clients_killed_30pct_aborts")
    if aborted:
        parts.append(f"below the minimum: job {aborted['job']} cleanly")
    fuzz = figures.get("fuzz_1000")
    if fuzz:
        parts.append(f"{sum(fuzz['rejected_per_category'].values())} fuzzed uploads all rejected "
                     f"({len(fuzz['rejected_per_category'])} categories), RSS {fuzz['rss_mb_before']} -> "
                     f"{fuzz['rss_mb_after']} MB")
    corrupt = figures.get("corrupt_state")
    if corrupt:
        parts.append(f"{corrupt['cases_detected']} corrupt-state cases detected")
    replays = figures.get("replays")
    if replays:
        parts.append(f"{replays['replays_sent']} replays stored once")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
