"""Coordinator overhead per round: N lightweight clients over real gRPC uploading real-size updates (the
MiniLM LoRA adapter), no training. Reports round wall time, server peak RSS, bytes per client and the
time FedAvg takes for the round.

    python bench/round_overhead.py [--clients 10 100 1000] [--backend sqlite|postgres|both] [--work runs/round]

Each N runs in a fresh coordinator process (so its peak RSS is its own); clients are threads of this
process sharing a few channels, each registering, polling, and uploading the global adapter perturbed.
--backend postgres keeps the coordinator's state in a throwaway PostgreSQL database and its artifacts in a
SeaweedFS bucket (edgeft.testing.postgres / seaweedfs, both on loopback, started and stopped here); sqlite is the
default embedded state (SQLite file and artifact folder); both runs each N on both, one after the other.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SERVER = """
import sys, time, json
from pathlib import Path
from edgeft.server.config import load_server_config
from edgeft.server.servicer import create_server
config = load_server_config(sys.argv[1])
server, port, coordinator = create_server(config)
server.start()
print(json.dumps({"port": port}), flush=True)
coordinator.wait_until_finished(timeout=3600)
aggregate_s = coordinator.last_close_seconds
hwm = [int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")][0]
print(json.dumps({"peak_rss_mb": hwm / 1024, "aggregate_s": aggregate_s}), flush=True)
server.stop(grace=1)
"""


def run(n: int, bundle: Path, work: Path, backend: dict | None = None) -> dict:
    """One round of ``n`` clients; ``backend``: {"database": URL, "s3": (endpoint, key, secret, region), "bucket"}
    for PostgreSQL + S3, None for the embedded default."""
    import grpc
    import numpy as np

    from edgeft.update import AdapterUpdate
    from edgeft.wire import (Capabilities, PollRequest, Registration, Task, UploadHeader, coordinator_stub, poll_request_to_pb,
                             poll_response_from_pb, registered_from_pb, registration_to_pb, update_to_parts)

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
    from edgeft.client.transport import Transport, open_channel
    from edgeft.server.auth import TokenStore
    from edgeft.server.store import open_database

    _, token = TokenStore(open_database(backend["database"] if backend else state / "state" / "state.db")).create("bench")
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(config)], stdout=subprocess.PIPE, text=True)
    port = json.loads(server.stdout.readline())["port"]
    channels = [open_channel(f"127.0.0.1:{port}", Transport(token=token, insecure=True)) for _ in range(4)]
    stubs = [coordinator_stub(c) for c in channels]
    device = Registration("", Capabilities(engines=("portable", "ort-training")))  # runs either engine's bundle
    devices = [registered_from_pb(stubs[i % 4].Register(registration_to_pb(device))) for i in range(n)]
    started = time.perf_counter()
    down, up, retries = [0] * n, [0] * n, [0] * n

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
        for attempt in range(5):  # as an agent does: UNAVAILABLE (the store or database busy) is retried
            try:
                stub.UploadUpdate(iter(parts))
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                    raise
                retries[i] += 1
                time.sleep(1 + attempt)

    with ThreadPoolExecutor(max_workers=min(n, 64)) as pool:
        list(pool.map(client, range(n)))
    round_s = time.perf_counter() - started
    result = json.loads(server.stdout.readline())
    server.wait(timeout=60)
    return {"clients": n, "backend": "postgres+s3" if backend else "sqlite+folder", "round_s": round(round_s, 2), "server_peak_rss_mb": round(result["peak_rss_mb"], 1),
            "aggregate_s": round(result["aggregate_s"], 3), "bytes_down_per_client": int(np.mean(down)),
            "bytes_up_per_client": int(np.mean(up)), "upload_retries": sum(retries)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument("--work", type=Path, default=Path("runs/round"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    from common import emit, minilm_bundle

    bundle = minilm_bundle(args.work)
    rows = []
    servers = []
    try:
        backends: list[dict | None] = [None] if args.backend == "sqlite" else []
        if args.backend in ("postgres", "both"):
            from edgeft.testing import postgres, seaweedfs

            cluster, store = postgres.PostgresCluster(), seaweedfs.SeaweedS3()
            servers += [cluster, store]
            cluster.start()
            store.start()
            store.create_bucket("bench")
            s3 = (store.endpoint, seaweedfs.ACCESS_KEY, seaweedfs.SECRET_KEY, seaweedfs.REGION)
            backends = ([None] if args.backend == "both" else []) + [{"s3": s3, "bucket": "bench", "cluster": cluster}]
        for n in args.clients:
            for backend in backends:
                if backend is not None:
                    backend["database"] = backend["cluster"].create_database()
                rows.append(run(n, bundle, args.work, backend))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        for server in servers:
            server.close()
    result = {"bench": "round_overhead", "adapter": "all-MiniLM-L6-v2 LoRA r=8 (query, value) + classifier", "rows": rows}
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    emit(result, "round_overhead: " + "; ".join(
        f"N={r['clients']} {r['backend']}: round {r['round_s']} s, FedAvg {r['aggregate_s']} s, "
        f"server RSS {r['server_peak_rss_mb']:.0f} MB" for r in rows))


if __name__ == "__main__":
    main()
