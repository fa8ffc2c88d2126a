"""The coordinator's gRPC server: grpc.aio on one event loop, in a thread of its own, with grpc.Server's synchronous
face (``start``, ``stop``) for the code that runs it.

Why one loop and not a pool of call threads: the coordinator's calls are short Python work (parse, check, one SQLite
transaction). On ~100 call threads they took turns at the GIL, and SQLite's one writer waited for it after every call
into sqlite3 (a transaction held the writer's turn 4.3-4.7 ms for 1.1 ms of CPU): one coordinator process took
70-90 updates a second. On one loop thread a call runs from start to end without a hand-over, and a long poll is a
coroutine asleep, not a thread held (docs/performance.md, "One event loop"). A call's database and file work holds up
the loop while it runs; nothing in a call waits for another call. The health service (synchronous, as its probe
thread sets it) runs on ``sync_threads`` threads of its own.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import grpc

STOP_S = 60.0  # how long stop() waits for the server to stop (beyond its grace)


class LoopServer:
    """A grpc.aio server on a fresh event loop of its own thread. ``setup(server)`` adds services and ports on the
    loop's thread (grpc.aio wants it); what it returns is kept as ``ready`` (the coordinator's: the port bound)."""

    def __init__(self, setup: Callable[[grpc.aio.Server], Any], options: list, maximum_concurrent_rpcs: int,
                 sync_threads: int):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="edgeft-loop", daemon=True)
        self._thread.start()
        self._sync = ThreadPoolExecutor(sync_threads, "edgeft-health")

        async def build() -> tuple:
            server = grpc.aio.server(migration_thread_pool=self._sync, options=options,
                                     maximum_concurrent_rpcs=maximum_concurrent_rpcs)
            return server, setup(server)

        try:
            self.server, self.ready = self.run(build())
        except BaseException:
            self._close()
            raise
        self._stopped = False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coroutine, timeout: float | None = None):  # noqa: ANN001, ANN201
        """Run ``coroutine`` on the loop and wait for its result (from any thread but the loop's)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> None:
        self.run(self.server.start())

    def stop(self, grace: float | None) -> None:
        """Stop serving (calls in progress get ``grace`` seconds, None: cancelled at once), then the loop."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.run(self.server.stop(grace), timeout=(grace or 0) + STOP_S)
        finally:
            self._close()

    def _close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=STOP_S)
        if not self._thread.is_alive():
            self.loop.close()
        self._sync.shutdown(wait=False)
