"""The messages of a secure aggregation round (``edgeft.secagg.protocol``), one per phase each way: plain frozen
dataclasses, carried over gRPC by ``edgeft.wire``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class PublicKeys:
    """Phase 1, client -> server: a client's two public keys."""

    device_id: str
    cipher_public: bytes
    mask_public: bytes


@dataclass(frozen=True)
class Roster:
    """Phase 1, server -> clients: the public keys of U1 and the round's threshold."""

    threshold: int
    keys: tuple[PublicKeys, ...]


@dataclass(frozen=True)
class EncryptedShares:
    """Phase 2: the shares ``sender`` gives ``recipient`` (of its mask key and self-mask seed), encrypted."""

    sender: str
    recipient: str
    ciphertext: bytes


@dataclass(frozen=True)
class SharedKeys:
    """Phase 2, client -> server: the encrypted shares for every peer and a commitment to the self-mask seed."""

    device_id: str
    self_mask_commitment: bytes
    shares: tuple[EncryptedShares, ...]


@dataclass(frozen=True)
class Inbox:
    """Phase 2, server -> one client: the shares addressed to it, one per other client of U2."""

    shares: tuple[EncryptedShares, ...]


@dataclass(frozen=True)
class MaskedInput:
    """Phase 3, client -> server: y_u, ring elements."""

    device_id: str
    data: np.ndarray


@dataclass(frozen=True)
class Survivors:
    """Phase 3, server -> clients: U3, the clients whose masked input arrived."""

    devices: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskShares:
    """Phase 4, client -> server: decrypted shares, by owner: of self-mask seeds (owners in U3) and of mask
    private keys (owners that dropped)."""

    device_id: str
    self_mask_shares: Mapping[str, bytes] = field(default_factory=dict)
    mask_key_shares: Mapping[str, bytes] = field(default_factory=dict)
