"""gRPC health checking for the coordinator: SERVING while its database and its artifact store answer,
NOT_SERVING while either does not (a probe thread, every ``interval_s``). Load balancers and orchestrators read
it (``grpc.health.v1.Health/Check``, service "" or ``edgeft.v1.Coordinator``); it needs no token."""

from __future__ import annotations

import logging
import threading

from edgeft import wire
from edgeft.errors import EdgeftError

log = logging.getLogger("edgeft.server")
PROBE_S = 1.0


class HealthProbe:
    """Sets ``servicer``'s status for the coordinator from ``probes`` (callables that raise when their service
    does not answer), now and every ``interval_s`` until ``stop``."""

    def __init__(self, servicer, probes: dict, interval_s: float = PROBE_S):  # noqa: ANN001
        self.servicer, self.probes, self.interval_s = servicer, probes, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failing: str | None = None  # why the coordinator is not serving (None: it is)

    def probe(self) -> bool:
        """Ask every service once and set the status; True when all answered."""
        from grpc_health.v1 import health_pb2

        failing = None
        for name, check in self.probes.items():
            try:
                check()
            except (EdgeftError, OSError) as exc:
                failing = f"{name}: {exc}"
                break
        if failing != self.failing:
            if failing is not None:
                log.warning("health: NOT_SERVING (%s)", failing)
            elif self.failing is not None:
                log.warning("health: SERVING again (%s)", ", ".join(self.probes))
        self.failing = failing
        status = (health_pb2.HealthCheckResponse.SERVING if failing is None
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", wire.SERVICE_NAME):
            self.servicer.set(service, status)
        return failing is None

    def start(self) -> None:
        self.probe()
        self._thread = threading.Thread(target=self._run, name="edgeft-health", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.probe()
            except Exception:  # noqa: BLE001 - the probe outlives one failed turn
                log.exception("the health probe's turn failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
