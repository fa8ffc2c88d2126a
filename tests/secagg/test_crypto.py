"""The primitives: both ends of an X25519 agreement derive the same key, bound to its round and purpose;
the PRG is deterministic per seed; AES-GCM refuses altered or re-routed ciphertexts."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.errors import SecAggError
from edgeft.secagg.crypto import CIPHER_PURPOSE, MASK_PURPOSE, KeyPair, decrypt, encrypt, prg


def test_key_agreement_is_symmetric_and_bound_to_context_and_purpose():
    a, b = KeyPair(), KeyPair()
    key = a.agree(b.public_bytes, MASK_PURPOSE, b"job:1")
    assert key == b.agree(a.public_bytes, MASK_PURPOSE, b"job:1") and len(key) == 32
    assert key != a.agree(b.public_bytes, MASK_PURPOSE, b"job:2")
    assert key != a.agree(b.public_bytes, CIPHER_PURPOSE, b"job:1")
    again = KeyPair.from_private_bytes(a.private_bytes)
    assert again.public_bytes == a.public_bytes
    with pytest.raises(SecAggError):
        a.agree(b"\x00" * 32, MASK_PURPOSE, b"job:1")  # low-order point


def test_prg_is_deterministic_and_looks_uniform():
    seed = bytes(range(32))
    one = prg(seed, 100_000, np.uint32)
    assert one.dtype == np.uint32 and np.array_equal(one, prg(seed, 100_000, np.uint32))
    assert not np.array_equal(one, prg(bytes(32), 100_000, np.uint32))
    assert abs(one.astype(np.float64).mean() / 2 ** 32 - 0.5) < 0.01
    assert prg(seed, 10, np.uint64).dtype == np.uint64


def test_authenticated_encryption_binds_sender_recipient_and_round():
    key = KeyPair().agree(KeyPair().public_bytes, CIPHER_PURPOSE, b"c")
    box = encrypt(key, b"share", "a", "b", b"c")
    assert decrypt(key, box, "a", "b", b"c") == b"share"
    for sender, recipient, context in (("b", "a", b"c"), ("a", "x", b"c"), ("a", "b", b"d")):
        with pytest.raises(SecAggError, match="do not decrypt"):
            decrypt(key, box, sender, recipient, context)
    flipped = box[:-1] + bytes([box[-1] ^ 1])
    with pytest.raises(SecAggError):
        decrypt(key, flipped, "a", "b", b"c")
