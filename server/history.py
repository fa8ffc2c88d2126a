"""A job's history: everything recorded about it, per round, in one JSON-ready dict (``edgeft history``,
``edgeft simulate``'s report, the tests)."""

from __future__ import annotations

from edgeft.errors import NotFound
from edgeft.server.async_state import AsyncState
from edgeft.server.config import JobConfig
from edgeft.server.state import State


def job_status(state: State, job_id: str) -> dict:
    row = state.job(job_id)
    if row is None:
        raise NotFound(f"unknown job {job_id!r}")
    return dict(row._mapping)


def job_history(state: State, job_id: str, job: JobConfig | None, head_init: str | None) -> dict:
    """Per round: status, wall time (``seconds``; Unix times ``opened_at``, ``closed_at``), the evaluation of the
    global adapter, per client its examples, training metrics and bytes up and down, and what the strategy
    reported (``aggregation``; with differential privacy ``privacy``: epsilon for the round and cumulative at
    delta). The job's ``privacy`` is the cumulative (epsilon, delta) spent so far (None without DP)."""
    status = job_status(state, job_id)
    record = state.job_record(job_id)
    round_rows, evals, downs, reports = record["rounds"], record["evaluations"], record["downloads"], record["reports"]
    refused = state.rejections(job_id)
    history = {"job": job_id, "status": status["status"], "message": status["message"],
               "strategy": job.strategy if job else None, "privacy": None,
               "duplicates": refused.pop("duplicate", 0), "rejections": refused, "head_init": head_init,
               "rounds": [] if any(r.number == 0 for r in round_rows) else
               [{"round": 0, "status": "initial", "evaluation": evals.get(0), "clients": []}]}
    for row in round_rows:
        clients = [{"device_id": u.device_id, "n_examples": u.n_examples, "metrics": u.metrics,
                    "bytes_up": u.bytes, "bytes_down": downs.get((row.number, u.device_id), 0)}
                   for u in record["updates"] if u.round == row.number]
        history["rounds"].append({
            "round": row.number, "status": row.status, "message": row.message, "selected": list(row.selected),
            "seconds": round(row.closed_at - row.opened_at, 2) if row.closed_at else None,
            "opened_at": row.opened_at, "closed_at": row.closed_at,
            "evaluation": evals.get(row.number), "clients": sorted(clients, key=lambda c: c["device_id"]),
            "aggregation": reports.get(row.number), "privacy": (reports.get(row.number) or {}).get("privacy")})
        if history["rounds"][-1]["privacy"]:  # the job's privacy spent so far: the latest cumulative figure
            spent = history["rounds"][-1]["privacy"]
            history["privacy"] = {"epsilon": spent["epsilon_cumulative"], "delta": spent["delta"],
                                  "rounds": spent["rounds_accounted"]}
    if job is not None and job.mode == "async":
        history["versions"] = version_history(AsyncState(state), job_id, evals, reports)
    return history


def version_history(state: AsyncState, job_id: str, evals: dict, reports: dict) -> list[dict]:
    """An asynchronous job's record per global version: its updates (device, the version each trained from,
    examples, bytes), updates accepted into it, uploads refused as stale since the previous version, mean
    staleness, what the strategy reported and the version's evaluation."""
    out = []
    for made in state.versions(job_id):
        report = reports.get(made["version"]) or {}
        facts = report.get("asynchronous") or {}
        out.append({**made, "accepted": facts.get("accepted", len(made["updates"])),
                    "refused_stale": facts.get("refused_stale", 0), "mean_staleness": facts.get("mean_staleness"),
                    "aggregation": report, "privacy": report.get("privacy"), "evaluation": evals.get(made["version"])})
    return out
