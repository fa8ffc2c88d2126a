"""Secure aggregation, measured: 10 clients with updates the size of the MiniLM LoRA adapter (103,565 values:
LoRA r=8 on query/value of 6 layers + the 77-class head), 0, 10% and 30% of them vanishing after the key
phase (the costliest point: the server rebuilds their pairwise masks), for 16-bit and 8-bit encodings.

    python bench/secagg.py [--clients 10] [--values 103565] [--repeats 1]

Reports per setting the max abs error of the unmasked weighted mean delta against the plain (float64) one,
and the bound step / 2; the bytes each client sends and receives per phase as serialized SecAgg* protobuf
messages (edgeft.wire) against a plain upload of the same update (float32 and float16); the compute time of
a client (mean over clients) and of the server per phase. In-process: the protocol objects exchange their
messages directly (no network), so times are compute only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import emit  # noqa: E402

from edgeft.secagg import FixedPoint, SecAggClient, SecAggServer, threshold_for  # noqa: E402
from edgeft.secagg.fixedpoint import ring_bits_for  # noqa: E402
from edgeft.secagg.updates import round_context  # noqa: E402
from edgeft.update import AdapterUpdate  # noqa: E402
from edgeft.wire import (SecAggHeader, UploadHeader, secagg_request_to_pb, secagg_response_to_pb,  # noqa: E402
                         update_to_parts)

PHASES = ("advertise", "share_keys", "masked_input", "unmask")
DELTA_STD = 0.01  # a round's LoRA deltas are of this order; clip = 6 std
CLIP = 0.06
MAX_WEIGHT = 1000


def one_round(ids: list[str], floats: dict, weights: dict, codec: FixedPoint, threshold: int, dropped: set[str]):
    """Run the protocol; returns (unmasked mean, clipped values, bytes up/down per phase, client s, server s)."""
    context = round_context("bench", 1)
    up = {p: [] for p in PHASES}
    down = {p: [] for p in PHASES}
    client_s = {p: 0.0 for p in ["encode", *PHASES]}
    server_s = {p: 0.0 for p in PHASES}
    started = time.perf_counter()
    vectors = {d: codec.encode(floats[d], weights[d]) for d in ids}
    client_s["encode"] = time.perf_counter() - started
    clients = {d: SecAggClient(d, context) for d in ids}
    server = SecAggServer(ids, threshold, vectors[ids[0]].size, codec.dtype, context)
    answers: dict = {}

    def phase(name: str, make, receive, alive) -> None:  # noqa: ANN001
        for d in alive:
            t = time.perf_counter()
            message = make(d)
            client_s[name] += time.perf_counter() - t
            up[name].append(secagg_request_to_pb(SecAggHeader("bench", 1, d), message).ByteSize())
            t = time.perf_counter()
            receive(message)
            server_s[name] += time.perf_counter() - t
        t = time.perf_counter()
        answers[name] = server.advance()
        server_s[name] += time.perf_counter() - t

    everyone = list(ids)
    phase("advertise", lambda d: clients[d].advertise(), server.receive_keys, everyone)
    down["advertise"] = [secagg_response_to_pb(answers["advertise"]).ByteSize()] * len(everyone)
    phase("share_keys", lambda d: clients[d].share_keys(answers["advertise"]), server.receive_shares, everyone)
    down["share_keys"] = [secagg_response_to_pb(answers["share_keys"][d]).ByteSize() for d in everyone]
    alive = [d for d in ids if d not in dropped]  # these vanish after the key phase
    phase("masked_input", lambda d: clients[d].masked_input(answers["share_keys"][d], vectors[d]),
          server.receive_masked, alive)
    down["masked_input"] = [secagg_response_to_pb(answers["masked_input"]).ByteSize()] * len(alive)
    phase("unmask", lambda d: clients[d].unmask(answers["masked_input"]), server.receive_unmask, alive)
    down["unmask"] = [secagg_response_to_pb("accepted").ByteSize()] * len(alive)
    t = time.perf_counter()
    mean, _ = codec.decode(answers["unmask"])
    server_s["decode"] = time.perf_counter() - t
    clipped = sum(int(np.count_nonzero(np.abs(floats[d]) > codec.clip)) for d in alive)
    return mean, clipped, up, down, client_s, server_s, len(alive)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--values", type=int, default=103_565)
    args = parser.parse_args()
    n = args.clients
    rng = np.random.default_rng(7)
    ids = [f"device-{i:03d}" for i in range(n)]
    floats = {d: rng.normal(0.0, DELTA_STD, size=args.values) for d in ids}
    weights = {d: int(rng.integers(50, 300)) for d in ids}
    plain_update = AdapterUpdate({"adapter": np.zeros(args.values, dtype=np.float32)}, 100)
    plain = {dtype: sum(p.ByteSize() for p in update_to_parts(UploadHeader("bench", 1, ids[0], "u"), plain_update,
                                                                dtype))
             for dtype in ("float32", "float16")}
    threshold = threshold_for(n, 0.3)
    runs = []
    for bits in (16, 8):
        codec = FixedPoint(bits=bits, clip=CLIP, ring_bits=ring_bits_for(bits, n * MAX_WEIGHT))
        for fraction in (0.0, 0.1, 0.3):
            dropped = set(ids[: int(fraction * n + 1e-9)])
            mean, clipped, up, down, client_s, server_s, alive = one_round(ids, floats, weights, codec, threshold,
                                                                            dropped)
            kept = [d for d in ids if d not in dropped]
            reference = sum(weights[d] * np.clip(floats[d], -CLIP, CLIP) for d in kept) / sum(weights[d] for d in kept)
            error = float(np.max(np.abs(mean - reference)))
            runs.append({
                "bits": bits, "ring_bits": codec.ring_bits, "step": codec.step, "dropout_fraction": fraction,
                "dropped": len(dropped), "survivors": alive, "threshold": threshold,
                "max_abs_error": error, "error_bound": codec.step / 2, "within_bound": error <= codec.step / 2 + 1e-12,
                "values_clipped": clipped,
                "bytes_up_per_client": {p: round(float(np.mean(v))) for p, v in up.items()},
                "bytes_down_per_client": {p: round(float(np.mean(v))) for p, v in down.items()},
                "bytes_up_total_per_client": round(sum(float(np.mean(v)) for v in up.values())),
                "client_seconds": {p: round(v / (n if p in ("encode", "advertise", "share_keys") else alive), 4)
                                   for p, v in client_s.items()},
                "server_seconds": {p: round(v, 4) for p, v in server_s.items()},
            })
    result = {"clients": n, "values": args.values, "clip": CLIP, "delta_std": DELTA_STD,
              "plain_upload_bytes": plain, "runs": runs}
    worst = max(r["max_abs_error"] / r["error_bound"] for r in runs)
    r16 = next(r for r in runs if r["bits"] == 16 and r["dropout_fraction"] == 0.3)
    summary = (f"secagg {n} clients x {args.values} values: unmasked mean within {worst:.2f} x step/2 in all "
               f"{len(runs)} runs (16-bit step {runs[0]['step']:.2e}, 8-bit {runs[-1]['step']:.2e}); up per client "
               f"{r16['bytes_up_total_per_client'] / 1e3:.0f} kB vs plain fp32 {plain['float32'] / 1e3:.0f} kB; "
               f"30% dropout: client {1e3 * sum(r16['client_seconds'].values()):.1f} ms, server "
               f"{1e3 * sum(r16['server_seconds'].values()):.1f} ms")
    emit(result, summary)


if __name__ == "__main__":
    main()
