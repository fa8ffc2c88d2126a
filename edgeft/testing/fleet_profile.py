"""TEST TOOLING: device heterogeneity for simulated fleets (``edgeft simulate``, lightweight devices): how fast each
device trains, when it is online, and how often it drops a task, all drawn from one seed so that synchronous and
asynchronous jobs can be compared on the same fleet.

- speed: device i's slowdown is exp(speed_sigma * z_i), z_i ~ N(0, 1) (log-normal, median 1): its training takes
  that many times the time it takes on this machine. A real agent sleeps ``(slowdown - 1) x`` its measured training
  time after training (nothing below 1: it cannot train faster than the machine); a lightweight device waits
  ``train_s x slowdown``.
- availability: each device is online ``availability`` of every ``period_s`` seconds, in one window at its own
  seeded phase; or, with ``windows`` (start, end) seconds within the period, in those windows for every device
  (a fleet that charges at night). A device asks for work only while online.
- dropout: each task is dropped (the device never uploads it) with probability ``dropout``, drawn per device and
  task in order from the device's own seeded stream.

``python -m edgeft.testing.fleet_profile --device-profile JSON AGENT_FLAGS...`` runs ``edgeft client`` under one
device's profile (``DeviceProfile.to_json``), through the agent's ``conditions`` hook.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeft.errors import ConfigError, check_config

log = logging.getLogger("edgeft.client")


@dataclass(frozen=True)
class FleetProfile:
    """A fleet's heterogeneity (module docstring); the default is a uniform, always-online fleet that never drops."""

    speed_sigma: float = 0.0
    availability: float = 1.0
    period_s: float = 600.0
    windows: tuple[tuple[float, float], ...] = ()
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_config(math.isfinite(self.speed_sigma) and self.speed_sigma >= 0, "speed_sigma", self.speed_sigma,
                     "must be >= 0 (the log-normal slowdown's sigma)")
        check_config(0 < self.availability <= 1, "availability", self.availability, "must be in (0, 1]")
        check_config(self.period_s > 0, "period_s", self.period_s, "must be a positive number of seconds")
        check_config(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")
        windows = tuple((float(a), float(b)) for a, b in self.windows)
        object.__setattr__(self, "windows", windows)
        check_config(all(0 <= a < b <= self.period_s for a, b in windows), "windows", list(windows),
                     "each window is (start, end) seconds with 0 <= start < end <= period_s")
        check_config(not (windows and self.availability < 1), "windows", list(windows),
                     "give availability or windows, not both")

    @property
    def uniform(self) -> bool:
        """No heterogeneity at all (every device as fast as the machine, always online, never dropping)."""
        return self.speed_sigma == 0 and self.availability == 1 and not self.windows and self.dropout == 0

    def device(self, index: int) -> DeviceProfile:
        """Device ``index``'s profile: the same for the same seed and index, whatever the fleet's size."""
        rng = np.random.default_rng([self.seed, index])
        slowdown = float(np.exp(self.speed_sigma * rng.standard_normal()))
        phase = float(rng.uniform(0, self.period_s))
        windows = self.windows or (((phase, phase + self.availability * self.period_s),)
                                   if self.availability < 1 else ())
        return DeviceProfile(slowdown=slowdown, dropout=self.dropout, period_s=self.period_s, windows=windows,
                             seed=int(rng.integers(2**31)))


@dataclass
class DeviceProfile:
    """One device's conditions. ``windows``: online intervals within each ``period_s`` (may wrap past its end;
    empty: always online). ``drops`` draws from the device's own stream, one draw per task."""

    slowdown: float = 1.0
    dropout: float = 0.0
    period_s: float = 600.0
    windows: tuple[tuple[float, float], ...] = ()
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.windows = tuple((float(a), float(b)) for a, b in self.windows)
        if self.slowdown <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"invalid device profile: slowdown={self.slowdown} (> 0), dropout={self.dropout} "
                              "(in [0, 1))")
        self._rng = np.random.default_rng(self.seed)

    def seconds_until_online(self, t: float) -> float:
        """0 while online at time ``t`` (seconds since the fleet's start), else the wait until the next window."""
        if not self.windows:
            return 0.0
        x = t % self.period_s
        waits = []
        for start, end in self.windows:
            for shift in (-self.period_s, 0.0):  # a window that wraps past the period's end
                a, b = start + shift, end + shift
                if a <= x < b:
                    return 0.0
                if a > x:
                    waits.append(a - x)
        return min(waits) if waits else self.period_s - x + min(a for a, _ in self.windows)

    def drops(self) -> bool:
        """Whether the next task is dropped."""
        return bool(self._rng.random() < self.dropout)

    def extra_seconds(self, trained_s: float) -> float:
        """The wait after ``trained_s`` seconds of real training that makes it last ``slowdown`` times as long."""
        return max(self.slowdown - 1.0, 0.0) * trained_s

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if not k.startswith("_")})

    @classmethod
    def from_json(cls, text: str) -> DeviceProfile:
        try:
            raw = json.loads(text)
            return cls(**{**raw, "windows": tuple(tuple(w) for w in raw.get("windows", ()))})
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"invalid --device-profile {text!r}: {exc}") from exc


@dataclass
class ProfiledConditions:
    """The agent's ``conditions`` hook for a device profile: online windows counted from ``started``."""

    profile: DeviceProfile
    started: float = field(default_factory=time.time)

    def seconds_until_online(self) -> float:
        return self.profile.seconds_until_online(time.time() - self.started)

    def drops(self) -> bool:
        return self.profile.drops()

    def after_training(self, trained_s: float) -> None:
        extra = self.profile.extra_seconds(trained_s)
        if extra > 0:
            log.info("simulated slowdown x%.2f: waiting %.1f s after %.1f s of training", self.profile.slowdown,
                     extra, trained_s)
            time.sleep(extra)


def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-profile", help="TEST TOOLING: the device's simulated conditions (DeviceProfile JSON)")
    parser.add_argument("--fleet-started", type=float, help="Unix time the fleet's availability clock started")


def conditions_of(args: argparse.Namespace) -> ProfiledConditions | None:
    if not args.device_profile:
        return None
    return ProfiledConditions(DeviceProfile.from_json(args.device_profile), args.fleet_started or time.time())


def main(argv: list[str] | None = None) -> int:
    """``python -m edgeft.testing.fleet_profile --device-profile JSON AGENT_FLAGS...``: ``edgeft client`` under a
    simulated device's conditions."""
    from edgeft.commands.client import add_arguments, run
    from edgeft.commands.common import execute

    parser = argparse.ArgumentParser(prog="python -m edgeft.testing.fleet_profile",
                                     description="TEST TOOLING: a device agent with simulated speed, availability "
                                                 "and dropouts")
    add_profile_argument(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return execute("client", lambda: run(args, conditions=conditions_of(args)))


if __name__ == "__main__":
    sys.exit(main())
