"""A prototype, not the product: the coordinator's servicer served by grpc.aio on one event-loop thread, each call's
handler (the same synchronous servicer methods) run in the loop, blocking it for as long as it takes.

It measures what the coordinator's ~100 threads cost (``bench/scale.py --aio-prototype``; docs/performance.md, "What
holds one coordinator process near 90 updates a second"): with one thread running Python, a sqlite3 call gets the
GIL back at once. What it leaves out, and a real design must not: long polls would block the loop (the bench asks
with ``poll_wait_s = 0``), no TLS, no health or reflection service, no upload-queue signal for admission
(``CallThreads``), and every call's database and file work holds up every other call."""
import asyncio
import threading

import grpc
from threadpoolctl import threadpool_limits

from edgeft import wire
from edgeft.server.coordinator import Coordinator
from edgeft.server.servicer import CoordinatorServicer, server_options


class _Abort(Exception):  # context.abort of a synchronous handler, aborted by the loop
    def __init__(self, code, details):
        super().__init__(details)
        self.code, self.details = code, details


class _Ctx:
    def __init__(self, ctx):
        self._c = ctx

    def invocation_metadata(self):
        return self._c.invocation_metadata()

    def peer(self):
        return self._c.peer()

    def is_active(self):
        return True

    def abort(self, code, details):
        raise _Abort(code, details)


def _handler(m, behaviour):
    if m.client_streaming:
        async def h(request_iterator, context):
            msgs = [r async for r in request_iterator]
            try:
                return behaviour(iter(msgs), _Ctx(context))
            except _Abort as e:
                await context.abort(e.code, e.details)
        return grpc.stream_unary_rpc_method_handler(h, request_deserializer=None,
                                                    response_serializer=m.serialize_response)
    if m.server_streaming:
        async def h(request, context):
            try:
                for item in behaviour(request, _Ctx(context)):
                    yield item
            except _Abort as e:
                await context.abort(e.code, e.details)
        return grpc.unary_stream_rpc_method_handler(h, request_deserializer=None,
                                                    response_serializer=m.serialize_response)

    async def h(request, context):
        try:
            return behaviour(request, _Ctx(context))
        except _Abort as e:
            await context.abort(e.code, e.details)
    return grpc.unary_unary_rpc_method_handler(h, request_deserializer=None, response_serializer=m.serialize_response)


class _Server:
    def __init__(self, loop, holder, coordinator):
        self.loop, self.holder, self.coordinator = loop, holder, coordinator

    def start(self):
        pass

    def stop(self, grace=None):
        asyncio.run_coroutine_threadsafe(self.holder["server"].stop(grace), self.loop).result(60)
        self.coordinator.stop_clock()


def create_server(config):
    limits = config.limits
    coordinator = Coordinator(config)
    threadpool_limits(1, user_api="blas")
    servicer = CoordinatorServicer(coordinator, config.poll_wait_s, limits)
    loop = asyncio.new_event_loop()
    ready, holder = threading.Event(), {}

    def run():
        asyncio.set_event_loop(loop)
        server = grpc.aio.server(options=server_options(limits), maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
        handlers = {m.name: _handler(m, getattr(servicer, m.name)) for m in wire.coordinator_methods()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(wire.SERVICE_NAME, handlers),))
        holder["port"] = server.add_insecure_port(config.address)
        loop.run_until_complete(server.start())
        holder["server"] = server
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True, name="aio-loop").start()
    ready.wait()
    coordinator.start_clock()
    return _Server(loop, holder, coordinator), holder["port"], coordinator
