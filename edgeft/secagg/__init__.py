"""Secure aggregation: pairwise-masked sums so that the coordinator learns only the aggregate of a round's
updates (Bonawitz et al., 2017, semi-honest server). Pure library code, no gRPC and no torch:

``fixedpoint`` (float vectors <-> ring elements, weighted), ``shamir`` (t-of-n secret sharing),
``crypto`` (X25519 + HKDF, AES-CTR PRG, AES-GCM from ``cryptography``), ``protocol`` (the client and
server state machines of the four phases), ``local`` (a whole round in one process, for tests and benches).
"""

from edgeft.secagg.fixedpoint import FixedPoint, ring_bits_for
from edgeft.secagg.protocol import (EncryptedShares, Inbox, MaskedInput, PublicKeys, Roster, SecAggClient, SecAggServer, SharedKeys,
                                    Survivors, UnmaskShares, threshold_for)

__all__ = ["EncryptedShares", "FixedPoint", "Inbox", "MaskedInput", "PublicKeys", "Roster", "SecAggClient", "SecAggServer",
           "SharedKeys", "Survivors", "UnmaskShares", "ring_bits_for", "threshold_for"]
