"""The four-phase protocol in one process with 5 to 20 clients: the unmasked sum equals the plain sum
exactly in the ring (so the decoded mean is within the fixed-point precision) with no dropouts, with
dropouts at every phase up to the tolerated fraction, and the round aborts below the threshold; what the
server holds never shows an input; clients refuse what a misbehaving server sends."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.errors import SecAggError
from edgeft.secagg import FixedPoint, SecAggClient, SecAggServer, threshold_for
from edgeft.secagg.local import run_round
from edgeft.secagg.protocol import Inbox, Roster, Survivors

PHASES = ("advertise", "share_keys", "masked_input", "unmask")


def inputs(count: int, length: int = 257, seed: int = 0, codec: FixedPoint | None = None):
    codec = codec or FixedPoint(bits=16, clip=1.0, ring_bits=32)
    rng = np.random.default_rng(seed)
    ids = [f"dev-{i:02d}" for i in range(count)]
    floats = {d: rng.uniform(-1, 1, size=length) for d in ids}
    weights = {d: int(rng.integers(1, 100)) for d in ids}
    return codec, floats, weights, {d: codec.encode(floats[d], weights[d]) for d in ids}


def plain_ring_sum(vectors, devices):
    total = np.zeros_like(next(iter(vectors.values())))
    for d in devices:
        total += vectors[d]
    return total


def test_threshold_for():
    assert threshold_for(10, 0.3) == 7
    assert threshold_for(10, 0.0) == 10
    assert threshold_for(10, 0.45) == 6
    assert threshold_for(3, 0.3) == 3  # 0.9 of a client: none tolerated
    assert threshold_for(3, 0.4) == 2
    assert threshold_for(20, 0.1) == 18


@pytest.mark.parametrize("count", [5, 10, 20])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
def test_dropouts_up_to_the_threshold_give_the_exact_sum(count, fraction):
    codec, floats, weights, vectors = inputs(count, seed=count)
    threshold = threshold_for(count, 0.3)
    dropped = int(fraction * count + 1e-9)  # 10 clients: 0, 1, 3; 20: 0, 2, 6
    ids = sorted(vectors)
    # spread the dropouts over the phases; the ones dropping at "unmask" still sent their masked input
    drop = {phase: [] for phase in PHASES}
    for i in range(dropped):
        drop[PHASES[i % 4]].append(ids[-1 - i])
    result = run_round(vectors, threshold, drop)
    gone_before_input = set(drop["advertise"] + drop["share_keys"] + drop["masked_input"])
    counted = [d for d in ids if d not in gone_before_input]
    assert result.survivors == tuple(counted)
    assert np.array_equal(result.total, plain_ring_sum(vectors, counted))  # exact in the ring
    mean, weight = codec.decode(result.total)
    plain = sum(weights[d] * floats[d] for d in counted) / sum(weights[d] for d in counted)
    assert weight == sum(weights[d] for d in counted)
    assert np.max(np.abs(mean - plain)) <= codec.step / 2 + 1e-12


@pytest.mark.parametrize("phase", PHASES)
def test_too_many_dropouts_abort_at_every_phase(phase):
    _, _, _, vectors = inputs(10)
    threshold = threshold_for(10, 0.3)  # 7: four dropouts are one too many
    with pytest.raises(SecAggError, match="fewer than the threshold 7"):
        run_round(vectors, threshold, {phase: sorted(vectors)[:4]})


def test_dropouts_spread_over_phases_beyond_the_threshold_abort():
    _, _, _, vectors = inputs(10)
    ids = sorted(vectors)
    with pytest.raises(SecAggError, match="aborted"):
        run_round(vectors, 7, {"share_keys": ids[:2], "masked_input": ids[2:4]})


def test_a_64_bit_ring_works_too():
    codec = FixedPoint(bits=16, clip=0.1, ring_bits=64)
    _, floats, weights, vectors = inputs(6, codec=codec)
    result = run_round(vectors, 4, {"masked_input": ["dev-05"], "unmask": ["dev-04"]})
    assert np.array_equal(result.total, plain_ring_sum(vectors, [f"dev-0{i}" for i in range(5)]))


def play_until_masked(count=5, threshold=3):
    _, _, _, vectors = inputs(count)
    ids = sorted(vectors)
    server = SecAggServer(ids, threshold, 258, np.uint32, b"t:1")
    clients = {d: SecAggClient(d, b"t:1") for d in ids}
    for d in ids:
        server.receive_keys(clients[d].advertise())
    roster = server.advance()
    for d in ids:
        server.receive_shares(clients[d].share_keys(roster))
    inboxes = server.advance()
    masked = {d: clients[d].masked_input(inboxes[d], vectors[d]) for d in ids}
    return server, clients, vectors, masked, inboxes


def test_a_masked_input_and_the_servers_state_reveal_no_input():
    server, clients, vectors, masked, _ = play_until_masked()
    for d, message in masked.items():
        assert not np.array_equal(message.data, vectors[d])
        # the masked vector is uniform-looking: its low bits match the input's no more than chance
        assert np.mean(message.data == vectors[d]) < 0.05
        server.receive_masked(message)
    # the server keeps the running sum only: no attribute holds any single input or masked input
    for value in vars(server).values():
        if isinstance(value, np.ndarray) and value.size == 258:
            assert all(not np.array_equal(value, v) for v in [*vectors.values(), *(m.data for m in masked.values())])


def test_a_repeated_message_is_counted_once_and_out_of_turn_refused():
    server, clients, vectors, masked, _ = play_until_masked()
    server.receive_masked(masked["dev-00"])
    server.receive_masked(masked["dev-00"])  # a retry: ignored
    assert server.u3 == ["dev-00"]
    with pytest.raises(SecAggError, match="while the round is at 'masked_input'"):
        server.receive_keys(SecAggClient("dev-01", b"t:1").advertise())
    with pytest.raises(SecAggError, match="not among the clients"):
        server.receive_masked(type(masked["dev-00"])("stranger", masked["dev-00"].data))


def test_clients_refuse_a_server_that_misbehaves():
    ids = ["a", "b", "c", "d"]
    clients = {d: SecAggClient(d, b"t:1") for d in ids}
    keys = tuple(clients[d].advertise() for d in ids)
    with pytest.raises(SecAggError, match="unsafe"):
        clients["a"].share_keys(Roster(2, keys))  # 2 of 4 is not more than half
    with pytest.raises(SecAggError, match="leaves this one out"):
        stranger = SecAggClient("e", b"t:1")
        stranger.advertise()
        stranger.share_keys(Roster(3, keys))
    with pytest.raises(SecAggError, match="at phase 'masked_input'"):  # a client that refused once stays out
        clients["a"].share_keys(Roster(3, keys))
    shared = {d: clients[d].share_keys(Roster(3, keys)) for d in ids if d != "a"}
    inbox = Inbox(tuple(s for m in shared.values() for s in m.shares if s.recipient == "c"))
    forged = Inbox(tuple(type(s)(s.sender, s.recipient, s.ciphertext[:-1] + b"\x00") for s in inbox.shares))
    with pytest.raises(SecAggError, match="do not decrypt"):
        clients["c"].masked_input(forged, np.zeros(5, dtype=np.uint32))
    clients["d"].masked_input(Inbox(tuple(s for m in shared.values() for s in m.shares if s.recipient == "d")),
                              np.zeros(5, dtype=np.uint32))
    with pytest.raises(SecAggError, match="not a subset"):
        clients["d"].unmask(Survivors(("a", "b", "d")))  # a never shared keys
    clients["b"].masked_input(Inbox(tuple(s for m in shared.values() for s in m.shares if s.recipient == "b")),
                              np.zeros(5, dtype=np.uint32))
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        clients["b"].unmask(Survivors(("b", "d")))


def test_aborted_round_refuses_further_messages_and_drops_the_sum():
    server, clients, vectors, masked, _ = play_until_masked(5, 4)
    for d in ("dev-00", "dev-01", "dev-02"):
        server.receive_masked(masked[d])
    with pytest.raises(SecAggError, match="3 of 5 clients answered"):
        server.advance()
    assert server.aborted and server.phase == "aborted"
    with pytest.raises(SecAggError, match="aborted"):
        server.receive_masked(masked["dev-03"])
    with pytest.raises(SecAggError, match="aborted"):
        server.advance()
