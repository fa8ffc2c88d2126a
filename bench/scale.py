"""Scale: N lightweight devices against one coordinator running an asynchronous (FedBuff) job. Reports accepted
updates per second, global versions per minute, p50/p99 upload latency, the coordinator's peak RSS (and its RSS
sampled over the run, to see whether memory stays flat as N grows), per N.

    python bench/scale.py [--devices 1000 10000 100000] [--duration 300] [--train-s 30] [--retry-s 30]
                          [--buffer-size 100] [--max-concurrency 2000] [--max-concurrent-rpcs N]
                          [--client-processes 1] [--replicas 1] [--work runs/scale]

Devices (edgeft.testing.lightweight) hold no model: each registers, asks for work, waits ``--train-s`` (times a
log-normal slowdown, --speed-sigma), uploads the task's global adapter perturbed (MiniLM + LoRA(q, v) + head: the
adapter's own names and shapes, 416 kB), waits ``--idle-s`` and asks again; while the coordinator's concurrency cap
(--max-concurrency) is reached, a device asks again when the coordinator says (its pace steering,
``server/pace.py``; or after about ``--retry-s``). Uploads draw their tensors from ``--update-pool`` synthetic
updates per global version, so the fleet's process spends its time on calls. They share ``--client-processes``
processes (an event loop each). The coordinator runs in its own process on loopback (plaintext: the figures are its
own overhead; every call still carries a token), with SQLite and an artifact folder; the job ends after
``--duration`` seconds (its time budget), the figures cover the whole run including registration. ``--replicas N``:
N coordinator processes on that one SQLite file and folder (docs/replicas.md), the devices' calls spread over them
by gRPC's round robin; their CPU and RSS are summed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import coordinator_script, start_coordinator, stop_coordinators  # noqa: E402

# how many versions the job made; devices still polling are told the job finished until the bench
# closes the coordinator's stdin
_REPORT = ('"versions": len(coordinator.history("scale").get("versions") or []), '
           '"in_versions": sum(v["accepted"] for v in coordinator.history("scale").get("versions") or [])')


_SERVER = coordinator_script(_REPORT, wait_s=7 * 24 * 3600, then="sys.stdin.read()")


def _rss_mb(pid: int) -> float | None:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmRSS")), None)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sample_rss(pids: list[int], samples: list, stop: threading.Event, every_s: float = 5.0) -> None:
    """Every ``every_s``: (seconds, the processes' RSS summed, MB) into ``samples``."""
    started = time.monotonic()
    while not stop.wait(every_s):
        values = [_rss_mb(pid) for pid in pids]
        if None not in values:
            samples.append((round(time.monotonic() - started, 1), round(sum(values), 1)))


def _fleet(settings: dict) -> dict:
    """One client process's devices (``settings``: LightFleetConfig fields and the token); returns its report."""
    from edgeft.client.transport import Transport
    from edgeft.testing.fleet_profile import FleetProfile
    from edgeft.testing.lightweight import LightFleet, LightFleetConfig

    settings = dict(settings)
    transport = Transport(token=settings.pop("token"), insecure=True)
    profile = FleetProfile(speed_sigma=settings.pop("speed_sigma"), seed=settings["seed"])
    report = LightFleet(LightFleetConfig(transport=transport, profile=profile, **settings)).run()
    latencies = [lat for _, lat in report.uploads]
    return {**report.summary(), "upload_ends": [end for end, _ in report.uploads], "latencies": latencies,
            "first_errors": report.errors[:3], "all_registered_at": report.all_registered_at}


def run(n: int, bundle: Path, work: Path, args: argparse.Namespace) -> dict:
    """One run of ``n`` devices against a fresh coordinator."""
    import numpy as np

    state = work / f"devices{n}"  # a fresh folder per run
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    server_table = '[server]\naddress = "127.0.0.1:0"\nstate_dir = "state"\npoll_wait_s = 1\ninsecure = true\n'
    limits = {"max_concurrent_rpcs": args.max_concurrent_rpcs,  # calls in progress; beyond: RESOURCE_EXHAUSTED
              "max_workers": args.max_workers,  # threads serving the health service
              "upload_workers": args.upload_workers}  # uploads in progress beyond these wait (admission's signal)
    if any(limits.values()):
        server_table += "[server.limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items() if v)
    config = state / "jobs.toml"
    config.write_text(server_table + f'[[job]]\nid = "scale"\nbundle = "{bundle.resolve()}"\nmode = "async"\n'
                      f'head_init = "none"\nround_deadline_s = {max(600.0, 20 * args.train_s)}\n'
                      f'[job.async]\nbuffer_size = {args.buffer_size}\nmax_concurrency = {args.max_concurrency}\n'
                      f'max_staleness = {args.max_staleness}\ntime_budget_s = {args.duration}\n')
    from edgeft.server.auth import TokenStore
    from edgeft.server.store import open_database

    engine = open_database(state / "state" / "state.db")
    _, token = TokenStore(engine).create("scale")
    engine.dispose()
    servers: list[subprocess.Popen] = []
    samples: list = []
    stop = threading.Event()
    try:
        for i in range(args.replicas):  # its warnings and any call's traceback kept in the log, for reading
            servers.append(start_coordinator(_SERVER, config,
                                             state / f"coordinator{i or ''}.log"))
        sampler = threading.Thread(target=_sample_rss, args=([s.pid for s in servers], samples, stop), daemon=True)
        sampler.start()
        processes = max(1, min(args.client_processes, n))
        shares = [n // processes + (i < n % processes) for i in range(processes)]
        address = ",".join(f"127.0.0.1:{server.port}" for server in servers)  # replicas: round robin (replicas.md)
        settings = [{"server": address, "token": token, "devices": share, "train_s": args.train_s,
                     "idle_s": args.idle_s, "retry_s": args.retry_s, "update_pool": args.update_pool,
                     "poll_wait_s": 0, "channels": args.channels, "duration_s": args.duration + 120,
                     "speed_sigma": args.speed_sigma, "seed": i, "start_together": args.start_together}
                    for i, share in enumerate(shares)]
        started = time.time()
        if processes == 1:
            reports = [_fleet(settings[0])]
        else:
            with multiprocessing.get_context("spawn").Pool(processes) as pool:
                reports = pool.map(_fleet, settings)
        finals = [json.loads(server.stdout.readline()) for server in servers]
        final = finals[0]  # versions are the database's: every replica reports the same
        server_cpu_s = sum(_cpu_s(server.pid) for server in servers)  # the job is over: registration included
        for server in servers:
            server.stdin.close()
        for server in servers:
            server.wait(timeout=120)
    finally:
        stop.set()
        stop_coordinators(servers)
    ends = sorted(e for r in reports for e in r["upload_ends"])
    latencies = np.array([lat for r in reports for lat in r["latencies"]] or [np.nan])
    accepted = sum(r["accepted"] for r in reports)
    span = (ends[-1] - ends[0]) if len(ends) > 1 else float("nan")
    minutes = (time.time() - started) / 60
    refused: dict[str, int] = {}
    retried: dict[str, int] = {}
    details: dict[str, str] = {}
    for r in reports:
        for total, counts in ((refused, r["refused"]), (retried, r["retried"])):
            for code, count in counts.items():
                total[code] = total.get(code, 0) + count
        for code, message in r["refused_details"].items():
            details.setdefault(code, message)
    registered_at = max(r["all_registered_at"] for r in reports)  # 0: some device never registered
    return {"devices": n, "registered": sum(r["registered"] for r in reports),
            "registration_s": round(registered_at - started, 1) if registered_at else None, "accepted": accepted,
            "accepted_per_s": round(accepted / span, 1) if span == span and span > 0 else None,
            # each minute from the first accepted upload: the ramp at the start, then the steady rate
            "accepted_per_s_by_minute": [round(float(c) / 60, 1) for c in np.bincount(
                ((np.array(ends) - ends[0]) // 60).astype(int))] if ends else [],
            "versions": final["versions"], "versions_per_min": round(final["versions"] / minutes, 2),
            # updates that went into a version by the end: accepted faster than versions are made, the rest wait
            "in_versions": final["in_versions"],
            "in_versions_per_s": round(final["in_versions"] / span, 1) if span == span and span > 0 else None,
            "upload_p50_s": round(float(np.nanpercentile(latencies, 50)), 3),
            "upload_p99_s": round(float(np.nanpercentile(latencies, 99)), 3),
            "refused": refused, "refused_details": details,
            "retries": retried, "waits": sum(r["waits"] for r in reports), "errors": sum(r["errors"] for r in reports),
            "first_errors": [e for r in reports for e in r["first_errors"]][:3],
            # with replicas: the sum of their peaks (and of their RSS in each sample)
            "server_peak_rss_mb": round(sum(f["peak_rss_mb"] for f in finals), 1), "server_rss_mb_samples": samples,
            "server_cpu_s": round(server_cpu_s, 1),
            "server_cpu_ms_per_update": round(1000 * server_cpu_s / accepted, 2) if accepted else None,
            "seconds": round(time.time() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds each run's job lasts (default 300)")
    parser.add_argument("--train-s", type=float, default=30.0, help="simulated training seconds (default 30)")
    parser.add_argument("--speed-sigma", type=float, default=1.0, help="log-normal slowdown sigma (default 1)")
    parser.add_argument("--idle-s", type=float, default=60.0, help="a device's pause after a task (default 60)")
    parser.add_argument("--retry-s", type=float,
                        help="a device's wait before asking again while the cap is reached (default: the "
                             "coordinator's advice, its pace steering)")
    parser.add_argument("--update-pool", type=int, default=8,
                        help="synthetic updates drawn per global version, shared by the fleet's uploads (default 8; "
                             "0: each drawn afresh)")
    parser.add_argument("--buffer-size", type=int, default=100)
    parser.add_argument("--max-concurrency", type=int, default=2000)
    parser.add_argument("--max-staleness", type=int, default=20)
    parser.add_argument("--max-concurrent-rpcs", type=int,
                        help="the coordinator's [server.limits] max_concurrent_rpcs (default: its own, 128)")
    parser.add_argument("--max-workers", type=int,
                        help="the coordinator's [server.limits] max_workers (default: its own, 4)")
    parser.add_argument("--upload-workers", type=int,
                        help="the coordinator's [server.limits] upload_workers (default: its own, 32)")
    parser.add_argument("--channels", type=int, default=8, help="gRPC channels per client process (default 8)")
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=1,
                        help="coordinator processes on the run's one SQLite file and artifact folder, each on its "
                             "own port; devices round-robin their calls over them (default 1). --max-concurrency is "
                             "the job's, counted in the database over all of them")
    parser.add_argument("--start-together", action="store_true",
                        help="devices ask for work only once all have registered (registration at full speed first)")
    parser.add_argument("--bundle", type=Path, help="an exported bench bundle to use (default: export it afresh)")
    parser.add_argument("--work", type=Path, default=Path("runs/scale"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    from common import emit, minilm_bundle

    bundle = args.bundle or minilm_bundle(args.work)
    result = {"bench": "scale", "adapter": "all-MiniLM-L6-v2 LoRA r=8 (query, value) + classifier",
              "settings": {k: v for k, v in vars(args).items() if k not in ("devices", "json_out", "bundle", "work")},
              "rows": []}
    for n in args.devices:
        try:
            row = run(n, bundle, args.work, args)
        except Exception as exc:  # noqa: BLE001 - a run that did not complete is a result too
            row = {"devices": n, "completed": False, "why": f"{type(exc).__name__}: {exc}"}
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "server_rss_mb_samples"}), file=sys.stderr, flush=True)
        if args.json_out:  # after every row: a long run that stops keeps what it measured
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    emit(result, "scale: " + "; ".join(
        f"N={r['devices']}: {r.get('accepted_per_s')} accepted/s ({r.get('in_versions_per_s')}/s into versions), "
        f"{r.get('versions_per_min')} versions/min, "
        f"p99 upload {r.get('upload_p99_s')} s, server peak RSS {r.get('server_peak_rss_mb')} MB, "
        f"{r.get('server_cpu_ms_per_update')} ms of server CPU per accepted update"
        for r in result["rows"]))


if __name__ == "__main__":
    main()
