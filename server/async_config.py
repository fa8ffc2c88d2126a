"""An asynchronous job's settings: ``[job.async]`` of a job with ``mode = "async"`` (FedBuff) as a typed, checked
dataclass. The arithmetic's own settings (buffer size, staleness weighting, max_staleness, server_lr) are
``edgeft.aggregate.fedbuff.FedBuffOptions``; this adds what the coordinator needs to run the job: the concurrency
cap and the stop condition. docs/jobs.md and docs/strategies.md are the reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

from edgeft.aggregate.fedbuff import TABLE, FedBuffOptions
from edgeft.aggregate.options import is_integer, is_number
from edgeft.errors import ConfigError, check_config

MODES = ("sync", "async")


@dataclass(frozen=True)
class AsyncJob:
    """``[job.async]``.

    fedbuff: buffer_size, staleness (constant | polynomial | hinge) and its parameters, max_staleness, server_lr.
    max_concurrency: at most this many devices hold work at once; the others are told to retry later.
    versions: the job ends once this many new global versions were made (None: only the time budget ends it).
    time_budget_s: the job ends this many seconds after it started (None: only ``versions`` ends it).
    """

    fedbuff: FedBuffOptions = field(default_factory=FedBuffOptions)
    max_concurrency: int = 100
    versions: int | None = None
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        check_config(is_integer(self.max_concurrency) and self.max_concurrency >= 1, f"{TABLE}.max_concurrency",
                     self.max_concurrency, "must be an integer >= 1")
        check_config(self.versions is None or (is_integer(self.versions) and self.versions >= 1),
                     f"{TABLE}.versions", self.versions, "must be an integer >= 1")
        check_config(self.time_budget_s is None or (is_number(self.time_budget_s) and self.time_budget_s > 0),
                     f"{TABLE}.time_budget_s", self.time_budget_s, "must be a positive number of seconds")
        check_config(self.versions is not None or self.time_budget_s is not None, f"{TABLE}.versions", None,
                     "an asynchronous job needs a stop condition: versions = N and/or time_budget_s")

    @classmethod
    def parse(cls, raw: "AsyncJob | Mapping[str, object] | None") -> "AsyncJob":
        """``[job.async]`` as a table (or an AsyncJob already); ConfigError names an unknown or bad key."""
        if isinstance(raw, AsyncJob):
            return raw
        raw = dict(raw or {})
        own = {f.name for f in dataclasses.fields(cls)} - {"fedbuff"}
        buffered = {f.name for f in dataclasses.fields(FedBuffOptions)}
        unknown = sorted(set(raw) - own - buffered)
        if unknown:
            raise ConfigError(f"unknown {TABLE}.{unknown[0]}; [job.async] takes {', '.join(sorted(own | buffered))}")
        options = FedBuffOptions(**{k: v for k, v in raw.items() if k in buffered})  # type: ignore[arg-type]
        return cls(fedbuff=options, **{k: v for k, v in raw.items() if k in own})  # type: ignore[arg-type]

    @property
    def rounds(self) -> int:
        """What the job's row records as its length: ``versions``, or a bound never reached (time budget only)."""
        return self.versions if self.versions is not None else 2**31 - 1
