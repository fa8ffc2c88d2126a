"""edgeft.client.transport: the channels a device (or a simulated fleet) opens."""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc

from edgeft.client.transport import Transport, open_aio_channel


def test_each_asyncio_channel_has_a_connection_of_its_own():
    """A fleet's channels to one address (same target, same arguments) are as many connections: the server sees
    as many peers. gRPC's shared subchannel pool had put them all on one."""
    peer = grpc.unary_unary_rpc_method_handler(lambda _request, context: context.peer().encode(),
                                               request_deserializer=bytes, response_serializer=bytes)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Peer", {"Which": peer})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    async def peers() -> set[bytes]:
        channels = [open_aio_channel(f"127.0.0.1:{port}", Transport(token="t", insecure=True)) for _ in range(3)]
        try:
            return {await channel.unary_unary("/test.Peer/Which")(b"", timeout=10) for channel in channels}
        finally:
            for channel in channels:
                await channel.close()

    try:
        assert len(asyncio.run(peers())) == 3
    finally:
        server.stop(grace=None)
