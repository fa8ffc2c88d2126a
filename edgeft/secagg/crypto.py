"""The cryptographic primitives of secure aggregation, all from ``cryptography`` (OpenSSL):

- X25519 key agreement between two clients, HKDF-SHA256 to turn the shared secret into a 32-byte key bound
  to the round (``context``) and its purpose (a pairwise mask seed, or an encryption key);
- a PRG that expands a 32-byte seed into a mask vector of ring elements (AES-256 in CTR mode over zeros);
- AES-256-GCM (authenticated encryption) for the shares one client sends another through the server,
  with sender, recipient and round as associated data, so the server can neither read nor re-route them.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from edgeft.errors import SecAggError

KEY_BYTES = 32
NONCE_BYTES = 12
MASK_PURPOSE = b"edgeft secagg pairwise mask v1"
CIPHER_PURPOSE = b"edgeft secagg share encryption v1"


class KeyPair:
    """An X25519 key pair; ``private_bytes`` (32 bytes) is what gets secret-shared."""

    def __init__(self, private: X25519PrivateKey | None = None):
        self.private = private or X25519PrivateKey.generate()
        self.public_bytes = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> "KeyPair":
        if len(raw) != KEY_BYTES:
            raise SecAggError(f"an X25519 private key has {KEY_BYTES} bytes, got {len(raw)}", reason="key")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    @property
    def private_bytes(self) -> bytes:
        return self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def agree(self, peer_public: bytes, purpose: bytes, context: bytes) -> bytes:
        """A 32-byte key both ends derive alike: HKDF-SHA256(X25519(self, peer), salt=context, info=purpose)."""
        if len(peer_public) != KEY_BYTES:
            raise SecAggError(f"an X25519 public key has {KEY_BYTES} bytes, got {len(peer_public)}", reason="key")
        try:
            shared = self.private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # a low-order point gives the all-zero secret
            raise SecAggError(f"unusable public key: {exc}", reason="key") from exc
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=context, info=purpose).derive(shared)


def random_seed() -> bytes:
    """32 bytes from the OS's CSPRNG."""
    return os.urandom(KEY_BYTES)


def commitment(seed: bytes, context: bytes) -> bytes:
    """SHA-256 of a self-mask seed in its round: lets the server check the seed it reconstructs."""
    return hashlib.sha256(b"edgeft secagg self-mask commitment v1" + context + seed).digest()


def prg(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """``length`` pseudo-random ring elements of ``dtype`` (uint32 or uint64) from a 32-byte seed."""
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"a mask seed has {KEY_BYTES} bytes, got {len(seed)}", reason="key")
    dtype = np.dtype(dtype)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    stream = encryptor.update(bytes(length * dtype.itemsize)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=dtype.newbyteorder("<")).astype(dtype)


def _associated(sender: str, recipient: str, context: bytes) -> bytes:
    return b"\x00".join([context, sender.encode(), recipient.encode()])


def encrypt(key: bytes, plaintext: bytes, sender: str, recipient: str, context: bytes) -> bytes:
    """nonce || AES-256-GCM(plaintext), bound to (sender, recipient, round)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _associated(sender, recipient, context))


def decrypt(key: bytes, ciphertext: bytes, sender: str, recipient: str, context: bytes) -> bytes:
    """The plaintext of ``encrypt``; SecAggError when it was altered or meant for another pair or round."""
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:],
                                   _associated(sender, recipient, context))
    except (InvalidTag, ValueError) as exc:
        raise SecAggError(f"the shares from {sender} to {recipient} do not decrypt: altered, or meant for another "
                          "device or round", reason="ciphertext") from exc
