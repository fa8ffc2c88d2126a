"""Secure aggregation of one round (Bonawitz et al., CCS 2017, the semi-honest variant): the server learns
the sum of the clients' ring vectors and nothing else about any one of them.

Four phases, each a message from every client still in the round, then one answer from the server:

1. advertise keys: each client makes two X25519 key pairs, ``cipher`` (to encrypt shares to its peers) and
   ``mask`` (for the pairwise mask seeds), and sends the public halves. The server answers with the roster
   U1 (at least ``threshold`` clients).
2. share keys: each client draws a self-mask seed b_u, splits b_u and its mask private key into t-of-|U1|
   Shamir shares, and sends share j to peer j encrypted with AES-GCM under the cipher key it agrees with
   j (the server routes them but cannot read them), plus a commitment to b_u. The server answers each
   client of U2 with the ciphertexts addressed to it.
3. masked input: client u sends y_u = x_u + PRG(b_u) + sum_{v in U2, v != u} +-PRG(s_uv) mod 2^k, with s_uv
   the seed u and v agree on from their mask keys, + when u < v and - when u > v: the pairwise masks of
   any two clients that both send cancel in the sum. The server adds y_u to a running sum (it keeps no
   single y_u) and answers with U3, the clients whose input arrived.
4. unmask: each client of U3 sends, for every peer of U2, the share of b_v when v is in U3, or the share of v's mask
   private key when v dropped after phase 2 (never both for one peer). With ``threshold`` answers the server rebuilds
   the self-masks of U3 and the pairwise masks between U3 and the dropped clients, removes them, and holds sum_{u in
   U3} x_u exactly.

At any phase with fewer than ``threshold`` clients left the round aborts (``SecAggError``) and the server removes no
mask: with fewer than t shares of every seed it cannot unmask any input. Clients check what the server sends them
(enough clients, themselves included, one key pair per client, survivors among those who shared keys). Not covered: a
server that lies to clients (the paper's consistency round and signatures), and clients that send garbage (no
robustness against malicious clients).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from edgeft.errors import SecAggError
from edgeft.secagg import shamir
from edgeft.secagg.messages import (EncryptedShares, Inbox, MaskedInput, PublicKeys, Roster, SharedKeys,  # noqa: F401
                                    Survivors, UnmaskShares)
from edgeft.secagg.crypto import (CIPHER_PURPOSE, MASK_PURPOSE, KeyPair, commitment, decrypt, encrypt, prg,
                                  random_seed)

PHASES = ("advertise", "share_keys", "masked_input", "unmask", "done")


# -- messages (edgeft.wire converts them to and from the SecAgg* protobuf messages) ----------------------
def threshold_for(selected: int, max_dropout_fraction: float) -> int:
    """t = the selected clients less the tolerated dropouts, at least 2 and more than half the round."""
    tolerated = int(np.floor(max_dropout_fraction * selected + 1e-9))
    return max(2, selected - tolerated, selected // 2 + 1)


def _mask_sum(own_id: str, keys: KeyPair, peers: Mapping[str, bytes], length: int, dtype: np.dtype,
              context: bytes) -> np.ndarray:
    """sum over peers v of +PRG(s_uv) (own_id < v) or -PRG(s_uv) (own_id > v), mod 2^k."""
    total = np.zeros(length, dtype=dtype)
    for peer, public in peers.items():
        mask = prg(keys.agree(public, MASK_PURPOSE, context), length, dtype)
        if own_id < peer:
            total += mask
        else:
            total -= mask
    return total


# -- the client ----------------------------------------------------------------------------------------
class SecAggClient:
    """One client's side of a round. Call, in order: ``advertise``, ``share_keys``, ``masked_input``,
    ``unmask``; each checks what the server sent."""

    def __init__(self, device_id: str, context: bytes):
        self.device_id = device_id
        self.context = context
        self.cipher = KeyPair()
        self.mask = KeyPair()
        self.self_mask_seed = random_seed()
        self.phase = "advertise"
        self._roster: dict[str, PublicKeys] = {}
        self._threshold = 0
        self._received: dict[str, tuple[bytes, bytes]] = {}  # owner -> (share of mask key, share of b)
        self._index: dict[str, int] = {}
        self._u2: tuple[str, ...] = ()

    def _expect(self, phase: str) -> None:
        if self.phase != phase:
            raise SecAggError(f"{self.device_id}: the protocol is at phase {self.phase!r}, not {phase!r}",
                              reason="phase")
        self.phase = PHASES[PHASES.index(phase) + 1]

    def advertise(self) -> PublicKeys:
        self._expect("advertise")
        return PublicKeys(self.device_id, self.cipher.public_bytes, self.mask.public_bytes)

    def share_keys(self, roster: Roster) -> SharedKeys:
        self._expect("share_keys")
        ids = [k.device_id for k in roster.keys]
        if len(set(ids)) != len(ids) or self.device_id not in ids:
            raise SecAggError(f"{self.device_id}: the roster repeats a client or leaves this one out", reason="roster")
        mine = next(k for k in roster.keys if k.device_id == self.device_id)
        if (mine.cipher_public, mine.mask_public) != (self.cipher.public_bytes, self.mask.public_bytes):
            raise SecAggError(f"{self.device_id}: the roster carries other keys for this client", reason="roster")
        if not 2 <= roster.threshold <= len(ids) or roster.threshold <= len(ids) // 2:
            raise SecAggError(f"{self.device_id}: threshold {roster.threshold} for {len(ids)} clients is unsafe "
                              "(it must be at least 2 and more than half)", reason="roster")
        self._roster = {k.device_id: k for k in roster.keys}
        self._threshold = roster.threshold
        order = sorted(ids)
        self._index = {d: i + 1 for i, d in enumerate(order)}
        key_shares = shamir.split(self.mask.private_bytes, roster.threshold, len(order))
        seed_shares = shamir.split(self.self_mask_seed, roster.threshold, len(order))
        out = []
        for device, (_, key_share), (_, seed_share) in zip(order, key_shares, seed_shares):
            if device == self.device_id:
                self._received[device] = (key_share, seed_share)
                continue
            key = self.cipher.agree(self._roster[device].cipher_public, CIPHER_PURPOSE, self.context)
            out.append(EncryptedShares(self.device_id, device,
                                       encrypt(key, key_share + seed_share, self.device_id, device, self.context)))
        return SharedKeys(self.device_id, commitment(self.self_mask_seed, self.context), tuple(out))

    def masked_input(self, inbox: Inbox, vector: np.ndarray) -> MaskedInput:
        """y = vector + PRG(b) + pairwise masks with every client of U2 (those whose shares came)."""
        self._expect("masked_input")
        senders = [s.sender for s in inbox.shares]
        if len(set(senders)) != len(senders) or any(s.recipient != self.device_id for s in inbox.shares):
            raise SecAggError(f"{self.device_id}: the inbox repeats a sender or carries shares for another client",
                              reason="inbox")
        if len(senders) + 1 < self._threshold:
            raise SecAggError(f"{self.device_id}: only {len(senders) + 1} clients shared keys, fewer than the "
                              f"threshold {self._threshold}", reason="below_threshold")
        for item in inbox.shares:
            if item.sender not in self._roster:
                raise SecAggError(f"{self.device_id}: shares from {item.sender}, who is not in the roster",
                                  reason="inbox")
            key = self.cipher.agree(self._roster[item.sender].cipher_public, CIPHER_PURPOSE, self.context)
            plain = decrypt(key, item.ciphertext, item.sender, self.device_id, self.context)
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise SecAggError(f"{self.device_id}: the shares from {item.sender} have the wrong size",
                                  reason="inbox")
            self._received[item.sender] = (plain[:shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES:])
        self._u2 = tuple(sorted([*senders, self.device_id]))
        vector = np.asarray(vector)
        if vector.dtype not in (np.uint32, np.uint64) or vector.ndim != 1:
            raise SecAggError("the input must be a flat vector of ring elements (uint32 or uint64)", reason="input")
        peers = {v: self._roster[v].mask_public for v in self._u2 if v != self.device_id}
        masked = vector + prg(self.self_mask_seed, vector.size, vector.dtype)
        masked += _mask_sum(self.device_id, self.mask, peers, vector.size, vector.dtype, self.context)
        return MaskedInput(self.device_id, masked)

    def unmask(self, survivors: Survivors) -> UnmaskShares:
        """The shares the server needs: self-mask seeds of U3, mask keys of those of U2 not in U3."""
        self._expect("unmask")
        u3 = set(survivors.devices)
        if len(u3) != len(survivors.devices) or not u3 <= set(self._u2) or self.device_id not in u3:
            raise SecAggError(f"{self.device_id}: the survivors are not a subset of the clients that shared keys "
                              "(or leave this one out)", reason="survivors")
        if len(u3) < self._threshold:
            raise SecAggError(f"{self.device_id}: {len(u3)} survivors, fewer than the threshold {self._threshold}",
                              reason="below_threshold")
        seeds = {v: self._received[v][1] for v in self._u2 if v in u3}
        keys = {v: self._received[v][0] for v in self._u2 if v not in u3}
        return UnmaskShares(self.device_id, seeds, keys)

    @property
    def share_index(self) -> int:
        return self._index[self.device_id]


# -- the server ----------------------------------------------------------------------------------------
class SecAggServer:
    """The server's side of one round: collects each phase's messages, then ``advance`` closes the phase
    (when every client expected answered, or at the phase's deadline) and returns what the clients get
    next. Holds the running sum of masked inputs, never a single one. Any SecAggError from ``advance``
    leaves the round aborted (``aborted`` says why)."""

    def __init__(self, selected: list[str] | tuple[str, ...], threshold: int, length: int, dtype: np.dtype,
                 context: bytes):
        if len(set(selected)) != len(selected):
            raise SecAggError("the selected clients repeat", reason="roster")
        if not 2 <= threshold <= len(selected):
            raise SecAggError(f"threshold {threshold} must be in [2, {len(selected)}] (the selected clients)",
                              reason="threshold")
        self.selected = tuple(sorted(selected))
        self.threshold = threshold
        self.length = length
        self.dtype = np.dtype(dtype)
        self.context = context
        self.phase = "advertise"
        self.aborted: str | None = None
        self.keys: dict[str, PublicKeys] = {}
        self.commitments: dict[str, bytes] = {}
        self._outbox: dict[str, list[EncryptedShares]] = {}
        self._sent_shares: set[str] = set()
        self._sum = np.zeros(length, dtype=self.dtype)
        self.u1: tuple[str, ...] = ()
        self.u2: tuple[str, ...] = ()
        self.u3: list[str] = []
        self._unmask: dict[str, UnmaskShares] = {}
        self.result: np.ndarray | None = None

    # what each phase waits for
    def expected(self) -> tuple[str, ...]:
        return {"advertise": self.selected, "share_keys": self.u1, "masked_input": self.u2,
                "unmask": tuple(self.u3)}.get(self.phase, ())

    def answered(self) -> set[str]:
        return {"advertise": set(self.keys), "share_keys": self._sent_shares, "masked_input": set(self.u3),
                "unmask": set(self._unmask)}.get(self.phase, set())

    def unmasked_by(self) -> set[str]:
        """The clients whose unmask shares arrived."""
        return set(self._unmask)

    def complete(self) -> bool:
        """Whether every client the phase waits for has answered."""
        return self.answered() >= set(self.expected())

    def _accept(self, phase: str, device_id: str) -> bool:
        """Whether to take this message (False: a repeat, ignored); SecAggError when out of turn."""
        if self.aborted is not None:
            raise SecAggError(f"the secure aggregation round aborted: {self.aborted}", reason="aborted")
        if self.phase != phase:
            raise SecAggError(f"{device_id} sent a {phase!r} message while the round is at {self.phase!r}",
                              reason="phase")
        if device_id not in self.expected():
            raise SecAggError(f"{device_id} is not among the clients phase {phase!r} waits for", reason="not_expected")
        return device_id not in self.answered()

    def receive_keys(self, message: PublicKeys) -> None:
        if not self._accept("advertise", message.device_id):
            return
        if len(message.cipher_public) != 32 or len(message.mask_public) != 32:
            raise SecAggError(f"{message.device_id}: public keys must have 32 bytes", reason="key")
        if message.cipher_public == message.mask_public or any(
                message.mask_public in (k.mask_public, k.cipher_public) for k in self.keys.values()):
            raise SecAggError(f"{message.device_id}: a public key used twice", reason="key")
        self.keys[message.device_id] = message

    def receive_shares(self, message: SharedKeys) -> None:
        if not self._accept("share_keys", message.device_id):
            return
        recipients = sorted(s.recipient for s in message.shares)
        wanted = sorted(d for d in self.u1 if d != message.device_id)
        if recipients != wanted or any(s.sender != message.device_id for s in message.shares):
            raise SecAggError(f"{message.device_id}: shares must go to every other client of the roster once",
                              reason="shares")
        if len(message.self_mask_commitment) != 32:
            raise SecAggError(f"{message.device_id}: the commitment must have 32 bytes", reason="shares")
        self.commitments[message.device_id] = message.self_mask_commitment
        for item in message.shares:
            self._outbox.setdefault(item.recipient, []).append(item)
        self._sent_shares.add(message.device_id)

    def receive_masked(self, message: MaskedInput) -> None:
        if not self._accept("masked_input", message.device_id):
            return
        data = np.asarray(message.data)
        if data.dtype != self.dtype or data.shape != (self.length,):
            raise SecAggError(f"{message.device_id}: a masked input of {self.length} {self.dtype} elements was "
                              f"expected, got {data.shape} {data.dtype}", reason="input")
        self._sum += data  # the only place a masked input is used: folded into the sum at once
        self.u3.append(message.device_id)

    def receive_unmask(self, message: UnmaskShares) -> None:
        if not self._accept("unmask", message.device_id):
            return
        u3 = set(self.u3)
        if set(message.self_mask_shares) != u3 or set(message.mask_key_shares) != set(self.u2) - u3:
            raise SecAggError(f"{message.device_id}: unmask shares must cover the self-masks of the survivors and "
                              "the mask keys of the dropped clients, exactly", reason="shares")
        self._unmask[message.device_id] = message

    def advance(self) -> Roster | dict[str, Inbox] | Survivors | np.ndarray:
        """Close the current phase with the clients that answered (SecAggError below the threshold) and return
        its answer: the Roster, each client's Inbox, the Survivors, or finally the unmasked ring sum."""
        if self.aborted is not None:
            raise SecAggError(f"the secure aggregation round aborted: {self.aborted}", reason="aborted")
        answered = sorted(self.answered())
        if len(answered) < self.threshold:
            self._abort(f"phase {self.phase!r}: {len(answered)} of {len(self.expected())} clients answered, fewer "
                        f"than the threshold {self.threshold}; no input was unmasked")
        try:
            return self._advance(answered)
        except SecAggError as exc:
            self._abort(f"phase {self.phase!r}: {exc}")
            raise AssertionError("unreachable")  # pragma: no cover

    def _abort(self, message: str) -> None:
        self.aborted = message
        self._sum = np.zeros(0, dtype=self.dtype)  # drop the masked sum
        self._outbox.clear()
        self.phase = "aborted"
        raise SecAggError(f"the secure aggregation round aborted: {message}", reason="below_threshold")

    def _advance(self, answered: list[str]):  # noqa: ANN202
        if self.phase == "advertise":
            self.u1 = tuple(answered)
            self.phase = "share_keys"
            return Roster(self.threshold, tuple(self.keys[d] for d in self.u1))
        if self.phase == "share_keys":
            self.u2 = tuple(answered)
            u2 = set(self.u2)
            inboxes = {d: Inbox(tuple(s for s in self._outbox.get(d, []) if s.sender in u2)) for d in self.u2}
            self._outbox.clear()
            self.phase = "masked_input"
            return inboxes
        if self.phase == "masked_input":
            self.u3 = sorted(self.u3)
            self.phase = "unmask"
            return Survivors(tuple(self.u3))
        if self.phase == "unmask":
            self.result = self._unmasked_sum(answered)
            self.phase = "done"
            return self.result
        raise SecAggError(f"the round is {self.phase}", reason="phase")

    def _unmasked_sum(self, answered: list[str]) -> np.ndarray:
        index = {d: i + 1 for i, d in enumerate(self.u1)}
        total = self._sum.copy()
        u3 = set(self.u3)
        for owner in self.u3:  # self-masks of the survivors
            seed = shamir.reconstruct([(index[d], self._unmask[d].self_mask_shares[owner]) for d in answered],
                                      self.threshold)
            if len(seed) != 32 or commitment(seed, self.context) != self.commitments[owner]:
                raise SecAggError(f"the self-mask seed rebuilt for {owner} does not match its commitment",
                                  reason="share")
            total -= prg(seed, self.length, self.dtype)
        for owner in sorted(set(self.u2) - u3):  # pairwise masks between the survivors and the dropped
            raw = shamir.reconstruct([(index[d], self._unmask[d].mask_key_shares[owner]) for d in answered],
                                     self.threshold)
            keys = KeyPair.from_private_bytes(raw) if len(raw) == 32 else None
            if keys is None or keys.public_bytes != self.keys[owner].mask_public:
                raise SecAggError(f"the mask key rebuilt for {owner} does not match its public key", reason="share")
            peers = {u: self.keys[u].mask_public for u in self.u3}
            # u's mask with owner was +PRG when u < owner: _mask_sum from owner's side gives the opposite signs
            total += _mask_sum(owner, keys, peers, self.length, self.dtype, self.context)
        self._sum = np.zeros(0, dtype=self.dtype)
        self._unmask.clear()
        return total
