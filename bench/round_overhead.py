"""Coordinator overhead per round: N lightweight clients over real gRPC uploading real-size updates (the
MiniLM LoRA adapter), no training. Reports round wall time, uploads per second, p50/p99 upload latency, peak RSS
of each coordinator process, bytes per client and the time FedAvg takes for the round.

    python bench/round_overhead.py [--clients 10 100 1000] [--backend sqlite|postgres|replicas|both|all]
                                   [--replicas 2] [--work runs/round]

Each N runs in fresh coordinator processes (so their peak RSS is their own); clients are threads of this
process sharing a few channels (at most 64 calls at once, as a thread pool), registered first, then each polling
and uploading the global adapter perturbed. (edgeft.testing.lightweight's devices, which bench/scale.py uses, poll
as soon as each registers: at 1,000 of them their long polls held the coordinator's 128 call slots and starved
the last registrations, so a round-time bench keeps its own clients.)
--backend postgres keeps the coordinator's state in a throwaway PostgreSQL database and its artifacts in a
SeaweedFS bucket (edgeft.testing.postgres / seaweedfs, both on loopback, started and stopped here); replicas runs
--replicas coordinator processes on that database and bucket, the clients spread over their addresses; sqlite is
the default embedded state (SQLite file and artifact folder); both runs each N on sqlite and postgres, all on the
three, one after the other.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import coordinator_script, start_coordinator, stop_coordinators  # noqa: E402

SERVER = coordinator_script('"aggregate_s": coordinator.last_close_seconds')


def run(n: int, bundle: Path, work: Path, backend: dict | None = None, replicas: int = 1) -> dict:
    """One round of ``n`` clients; ``backend``: {"database": URL, "s3": (endpoint, key, secret, region), "bucket"}
    for PostgreSQL + S3, None for the embedded default; ``replicas`` coordinator processes share it."""
    state = work / f"n{n}"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    config = state / "jobs.toml"
    # plaintext on loopback: the figures are the coordinator's own overhead (every call still carries a token)
    config.write_text(f'[server]\naddress = "127.0.0.1:0"\nstate_dir = "state"\npoll_wait_s = 1\ninsecure = true\n'
                      f'[[job]]\nid = "bench"\nbundle = "{bundle.resolve()}"\nrounds = 1\nround_deadline_s = 3600\nhead_init = "none"\n'
                      f'[job.clients]\nfraction = 1.0\nmin = {n}\n')
    if backend:  # the [server] keys must precede [[job]]: put them right after the [server] table's first lines
        endpoint, key, secret, region = backend["s3"]
        extra = (f'database = "{backend["database"]}"\nartifacts = "s3://{backend["bucket"]}/n{n}-{time.time_ns()}"\n')
        s3 = (f'[server.s3]\nendpoint_url = "{endpoint}"\nregion = "{region}"\naccess_key_id = "{key}"\n'
              f'secret_access_key = "{secret}"\n')
        text = config.read_text().replace("insecure = true\n", "insecure = true\n" + extra + s3, 1)
        config.write_text(text)
    for i in range(1, replicas):  # each replica with its own state folder (its bundle cache), on the same backend
        (state / f"jobs{i}.toml").write_text(config.read_text().replace('state_dir = "state"', f'state_dir = "state{i}"'))
    from edgeft.server.auth import TokenStore
    from edgeft.server.store import open_database

    database = backend["database"] if backend else state / "state" / "state.db"
    _, token = TokenStore(open_database(database)).create("bench")
    servers = []
    try:
        for i in range(replicas):
            servers.append(start_coordinator(SERVER, state / f"jobs{i or ''}.toml"))
        return _round(n, token, servers, backend, replicas, database)
    finally:
        stop_coordinators(servers)


def _round(n: int, token: str, servers: list, backend: dict | None, replicas: int, database) -> dict:  # noqa: ANN001
    """The clients' round against running coordinators (4 channels, spread over their ports), then their reports.
    The round's wall time ends when it closed (its row's closed_at, whichever replica closed it)."""
    import grpc
    import numpy as np

    from edgeft.client.transport import Transport, open_channel
    from edgeft.update import AdapterUpdate
    from edgeft.wire import (Capabilities, PollRequest, Registration, Task, UploadHeader, coordinator_stub, poll_request_to_pb,
                             poll_response_from_pb, registered_from_pb, registration_to_pb, update_to_parts)

    channels = [open_channel(f"127.0.0.1:{servers[i % len(servers)].port}", Transport(token=token, insecure=True))
                for i in range(4)]
    stubs = [coordinator_stub(c) for c in channels]
    device = Registration("", Capabilities(engines=("portable", "ort-training")))  # runs either engine's bundle
    devices = [registered_from_pb(stubs[i % 4].Register(registration_to_pb(device))) for i in range(n)]
    started_at = time.time()
    down, up, retries = [0] * n, [0] * n, [0] * n
    upload_at = [(0.0, 0.0)] * n  # (start, end) of each client's upload, retries included

    def client(i: int) -> None:
        stub = stubs[i % 4]
        while True:
            reply = stub.PollTask(poll_request_to_pb(PollRequest(devices[i], wait_seconds=1)))
            task = poll_response_from_pb(reply)
            if isinstance(task, Task):
                break
        down[i] = reply.ByteSize()
        rng = np.random.default_rng(i)
        tensors = {name: value + rng.normal(0, 1e-3, value.shape).astype(np.float32)
                   for name, value in task.global_adapter.items()}
        parts = list(update_to_parts(UploadHeader(task.job_id, task.round, devices[i], f"u{i}"),
                                     AdapterUpdate(tensors, 100 + i)))
        up[i] = sum(p.ByteSize() for p in parts)
        begun = time.perf_counter()
        for attempt in range(5):  # as an agent does: UNAVAILABLE (the store or database busy) is retried
            try:
                stub.UploadUpdate(iter(parts))
                upload_at[i] = (begun, time.perf_counter())
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                    raise
                retries[i] += 1
                time.sleep(1 + attempt)

    try:
        with ThreadPoolExecutor(max_workers=min(n, 64)) as pool:
            list(pool.map(client, range(n)))
    finally:  # a channel left open keeps its threads (and reconnection attempts) into the next row's round
        for channel in channels:
            channel.close()
    reports = [json.loads(server.stdout.readline()) for server in servers]  # each: once every job finished
    from edgeft.server.state import State
    from edgeft.server.store import open_database

    state = State(open_database(database, upgrade=False))
    round_s = state.round("bench", 1).closed_at - started_at
    state.engine.dispose()
    for server in servers:
        server.wait(timeout=60)
    latency = np.array([end - begun for begun, end in upload_at])
    uploading = max(end for _, end in upload_at) - min(begun for begun, _ in upload_at)
    return {"clients": n, "backend": ("postgres+s3" if backend else "sqlite+folder"), "replicas": replicas,
            "round_s": round(round_s, 2), "uploads_per_s": round(n / uploading, 1),
            "upload_p50_s": round(float(np.percentile(latency, 50)), 3),
            "upload_p99_s": round(float(np.percentile(latency, 99)), 3),
            "server_peak_rss_mb": [round(r["peak_rss_mb"], 1) for r in reports],
            # the time the closing replica took to aggregate (a replica that closed nothing reports 0)
            "aggregate_s": round(max(r["aggregate_s"] for r in reports), 3),
            "bytes_down_per_client": int(np.mean(down)), "bytes_up_per_client": int(np.mean(up)),
            "upload_retries": sum(retries)}


BACKENDS = {"sqlite": ["sqlite"], "postgres": ["postgres"], "replicas": ["replicas"], "both": ["sqlite", "postgres"],
            "all": ["sqlite", "postgres", "replicas"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--backend", choices=tuple(BACKENDS), default="sqlite")
    parser.add_argument("--replicas", type=int, default=2, help="coordinator processes of --backend replicas")
    parser.add_argument("--bundle", type=Path, help="an exported bench bundle to use (default: export it afresh)")
    parser.add_argument("--work", type=Path, default=Path("runs/round"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    from common import emit, minilm_bundle

    bundle = args.bundle or minilm_bundle(args.work)
    kinds = BACKENDS[args.backend]
    result = {"bench": "round_overhead", "adapter": "all-MiniLM-L6-v2 LoRA r=8 (query, value) + classifier", "rows": []}
    servers = []
    try:
        if kinds != ["sqlite"]:
            from edgeft.testing import postgres, seaweedfs

            # room for every update of the run (416 kB each) in 1 GB volumes; the tests' default holds 1.28 GB
            volumes = 4 + int(sum(args.clients) * 0.5e6 * len(kinds) / 1e9)
            cluster, store = postgres.PostgresCluster(), seaweedfs.SeaweedS3(volume_size_mb=1024, volumes=volumes)
            servers += [cluster, store]
            cluster.start()
            store.start()
            store.create_bucket("bench")
            s3 = (store.endpoint, seaweedfs.ACCESS_KEY, seaweedfs.SECRET_KEY, seaweedfs.REGION)
        for n in args.clients:
            for kind in kinds:
                backend = None if kind == "sqlite" else {"s3": s3, "bucket": "bench",
                                                         "database": cluster.create_database()}
                replicas = args.replicas if kind == "replicas" else 1
                try:
                    row = run(n, bundle, args.work, backend, replicas)
                except Exception as exc:  # noqa: BLE001 - a round that did not complete is a result too
                    row = {"clients": n, "backend": "sqlite+folder" if backend is None else "postgres+s3",
                           "replicas": replicas, "completed": False, "why": f"{type(exc).__name__}: {exc}"}
                result["rows"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if args.json_out:  # after every row: a long run that stops keeps what it measured
                    args.json_out.parent.mkdir(parents=True, exist_ok=True)
                    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        for server in servers:
            server.close()
    emit(result, "round_overhead: " + "; ".join(
        f"N={r['clients']} {r['backend']} x{r['replicas']}: round {r.get('round_s', 'not completed')} s, "
        f"FedAvg {r.get('aggregate_s')} s, server RSS {r.get('server_peak_rss_mb')} MB" for r in result["rows"]))


if __name__ == "__main__":
    main()
