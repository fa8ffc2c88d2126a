"""A whole secure aggregation round in one process: every client and the server as objects, messages passed
directly. For tests and the benchmark; the coordinator and the agents run the same objects over gRPC."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from edgeft.secagg.protocol import SecAggClient, SecAggServer

PHASE_NAMES = ("advertise", "share_keys", "masked_input", "unmask")


@dataclass
class LocalRound:
    """The outcome of ``run_round``: the unmasked ring sum, and who took part in each phase; per phase the
    bytes each client sent (payload bytes: keys, ciphertexts, ring elements, shares) and the seconds spent
    by all clients together and by the server."""

    total: np.ndarray
    survivors: tuple[str, ...]
    client_seconds: dict[str, float] = field(default_factory=dict)
    server_seconds: dict[str, float] = field(default_factory=dict)
    bytes_sent: dict[str, list[int]] = field(default_factory=dict)


def run_round(vectors: Mapping[str, np.ndarray], threshold: int, drop: Mapping[str, Sequence[str]] | None = None,
              context: bytes = b"local:1") -> LocalRound:
    """Run one round over ring ``vectors`` (device id -> uint32/uint64 vector); ``drop`` maps a phase name
    to the clients that vanish before sending that phase's message. Raises SecAggError when it aborts."""
    drop = {k: set(v) for k, v in (drop or {}).items()}
    ids = sorted(vectors)
    first = vectors[ids[0]]
    server = SecAggServer(ids, threshold, first.size, first.dtype, context)
    clients = {d: SecAggClient(d, context) for d in ids}
    alive = set(ids)
    stats = LocalRound(np.zeros(0), ())

    def clock(phase: str, where: dict, started: float) -> None:
        where[phase] = where.get(phase, 0.0) + time.perf_counter() - started

    def phase(name: str, make, receive) -> None:  # noqa: ANN001
        alive.difference_update(drop.get(name, ()))
        sizes = []
        for device in sorted(alive & set(server.expected())):
            started = time.perf_counter()
            message = make(device)
            clock(name, stats.client_seconds, started)
            sizes.append(_payload(message))
            started = time.perf_counter()
            receive(message)
            clock(name, stats.server_seconds, started)
        stats.bytes_sent[name] = sizes

    def advance(name: str):  # noqa: ANN202
        started = time.perf_counter()
        answer = server.advance()
        clock(name, stats.server_seconds, started)
        return answer

    phase("advertise", lambda d: clients[d].advertise(), server.receive_keys)
    roster = advance("advertise")
    phase("share_keys", lambda d: clients[d].share_keys(roster), server.receive_shares)
    inboxes = advance("share_keys")
    phase("masked_input", lambda d: clients[d].masked_input(inboxes[d], vectors[d]), server.receive_masked)
    survivors = advance("masked_input")
    phase("unmask", lambda d: clients[d].unmask(survivors), server.receive_unmask)
    stats.total = advance("unmask")
    stats.survivors = survivors.devices
    return stats


def _payload(message: object) -> int:
    """The payload bytes of a protocol message (what dominates its size on the wire)."""
    from edgeft.secagg import protocol as p

    if isinstance(message, p.PublicKeys):
        return len(message.cipher_public) + len(message.mask_public)
    if isinstance(message, p.SharedKeys):
        return len(message.self_mask_commitment) + sum(len(s.ciphertext) for s in message.shares)
    if isinstance(message, p.MaskedInput):
        return int(message.data.nbytes)
    if isinstance(message, p.UnmaskShares):
        return sum(len(v) for v in message.self_mask_shares.values()) + sum(
            len(v) for v in message.mask_key_shares.values())
    return 0
