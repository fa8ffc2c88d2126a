"""Time closing one round of N stored MiniLM-LoRA-size updates (416 kB each) on the folder store and SQLite: streamed
(every update read back, as before running sums) against folded as they came (``edgeft.server.running_sums``: a
flush every ``--flush-every`` updates, as the clock would, then the closing's own flush, one SELECT, the sums folded
in). Transport-free: the coordinator's State, FolderStore and RunningSums, no job bundle.

    python scripts/time_running_sums.py --updates 2000 [--clip-norm 0.5] [--work /tmp/sums]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edgeft.aggregate import StrategyOptions, WeightedMean
from edgeft.aggregate.delta import DeltaMean
from edgeft.server.artifacts import FolderStore
from edgeft.server.running_sums import RunningSums, stream_rows
from edgeft.server.state import open_state
from edgeft.server.sum_state import SumState
from edgeft.update import AdapterUpdate



def adapter(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    """The shapes of a MiniLM-L6 LoRA adapter (416 kB in float32): 6 layers x (A, B) of query and value at rank 8,
    384 wide, and BANKING77's head (77 x 384 and its bias)."""
    shapes = {f"layer{i}.{m}.lora_{p}": (8, 384) if p == "A" else (384, 8) for i in range(6)
              for m in ("query", "value") for p in ("A", "B")}
    shapes.update({"head.weight": (77, 384), "head.bias": (77,)})
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--flush-every", type=int, default=100)
    parser.add_argument("--clip-norm", type=float, default=None, help="DeltaMean (clipping) instead of FedAvg's mean")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="edgeft-sums-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(0)
    initial = adapter(rng)
    options = StrategyOptions(clip_norm=args.clip_norm)

    def start(job=None, number=1):  # noqa: ANN001, ANN202 - the job's strategy over the round's global adapter
        return WeightedMean(initial) if args.clip_norm is None else DeltaMean(initial, options)

    artifacts = FolderStore(work / "artifacts")
    state = open_state(f"sqlite:///{work / 'state.db'}", artifacts)
    devices = [f"d{i:05d}" for i in range(args.updates)]
    state.create_job("bench", "0" * 64, 1, 1, artifacts.put_tensors(initial), {}, {})
    state.open_round("bench", 1, devices, 3600.0)
    sums = RunningSums(SumState(state), artifacts, start, "timing")
    job, fold_s, flush_s = SimpleNamespace(id="bench"), 0.0, 0.0
    for i, device in enumerate(devices):
        tensors = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in initial.items()}
        update = AdapterUpdate(tensors, int(rng.integers(10, 100)))
        blob = artifacts.put_tensors(tensors)
        state.add_update("bench", 1, device, f"u{i}", update.n_examples, {}, blob, 416_000)
        t = time.perf_counter()
        sums.fold(job, 1, device, update)
        fold_s += time.perf_counter() - t
        if (i + 1) % args.flush_every == 0:
            t = time.perf_counter()
            sums.flush()
            flush_s += time.perf_counter() - t
    t = time.perf_counter()
    streamed = start()
    for stored in stream_rows(artifacts, state.update_rows("bench", 1)):
        streamed.add(stored)
    expected = streamed.result()
    streamed_s = time.perf_counter() - t
    t = time.perf_counter()
    folded = start()
    sums.flush("bench", 1)  # the closing replica's own sum first
    sums.feed(folded, "bench", 1, lambda rows: stream_rows(artifacts, rows))
    result = folded.result()
    summed_s = time.perf_counter() - t
    error = max(float(np.abs(result[k] - expected[k]).max()) for k in expected)
    assert folded.report() == streamed.report(), (folded.report(), streamed.report())
    print(json.dumps({"updates": args.updates, "aggregation": "DeltaMean" if args.clip_norm else "WeightedMean",
                      "close_streamed_s": round(streamed_s, 3), "close_running_sums_s": round(summed_s, 3),
                      "fold_ms_per_update": round(1000 * fold_s / args.updates, 3),
                      "flush_ms_each": round(1000 * flush_s / max(1, args.updates // args.flush_every), 2),
                      "max_abs_difference": error}))
    state.engine.dispose()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
