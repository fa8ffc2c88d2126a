"""Shamir's t-of-n secret sharing over the prime field GF(2^521 - 1), for secrets of up to 64 bytes.

A secret s is the constant term of a random polynomial f of degree t - 1; share i is (i, f(i)) for
i = 1..n. Any t shares give s back by Lagrange interpolation at 0; t - 1 shares are uniformly distributed
whatever s is (they say nothing about it). The coefficients come from ``secrets`` (the OS's CSPRNG).
2^521 - 1 is a Mersenne prime, so every secret of 64 bytes or fewer is a field element.
"""

from __future__ import annotations

import functools
import secrets as _secrets
from typing import Sequence

from edgeft.errors import SecAggError

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
MAX_SECRET_BYTES = 64


def _randbelow(prime: int) -> int:
    return _secrets.randbelow(prime)


def split_int(secret: int, threshold: int, count: int, prime: int = PRIME) -> list[tuple[int, int]]:
    """``count`` shares (x, f(x)), x = 1..count, of ``secret`` in GF(prime); any ``threshold`` reconstruct it."""
    if not 1 <= threshold <= count:
        raise SecAggError(f"threshold {threshold} must be in [1, {count}] (the number of shares)")
    if count >= prime:
        raise SecAggError(f"{count} shares need a field larger than {prime}")
    if not 0 <= secret < prime:
        raise SecAggError("the secret is not an element of the field")
    coefficients = [secret] + [_randbelow(prime) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, count + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % prime
        shares.append((x, y))
    return shares


def _check_shares(shares: Sequence[tuple[int, int]], threshold: int, prime: int) -> None:
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot reconstruct a secret shared with threshold {threshold}",
                          reason="below_threshold")
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise SecAggError(f"duplicate share indices {sorted(xs)}", reason="share")
    for x, y in shares:
        if not (0 < x < prime and 0 <= y < prime):
            raise SecAggError(f"share ({x}, ...) is not a point of the field", reason="share")


@functools.lru_cache(maxsize=64)
def _coefficients(xs: tuple[int, ...], at: int, prime: int) -> tuple[int, ...]:
    """The Lagrange basis values l_j(at) for points at ``xs``: the same for every secret rebuilt from the
    same share indices (the server rebuilds every seed of a round from the same devices' shares)."""
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (at - xm) % prime
                den = den * (xj - xm) % prime
        out.append(num * pow(den, -1, prime) % prime)
    return tuple(out)


def _interpolate(points: Sequence[tuple[int, int]], at: int, prime: int) -> int:
    """f(at) for the polynomial of degree len(points) - 1 through ``points`` (Lagrange)."""
    basis = _coefficients(tuple(x for x, _ in points), at, prime)
    return sum(y * c for (_, y), c in zip(points, basis)) % prime


def reconstruct_int(shares: Sequence[tuple[int, int]], threshold: int, prime: int = PRIME) -> int:
    """The secret from at least ``threshold`` shares. With more, every extra share must lie on the polynomial
    the first ``threshold`` define: a wrong share is detected (SecAggError) instead of giving a wrong secret."""
    _check_shares(shares, threshold, prime)
    basis = list(shares[:threshold])
    for x, y in shares[threshold:]:
        if _interpolate(basis, x, prime) != y:
            raise SecAggError(f"share {x} does not lie on the polynomial of the others: a share is wrong",
                              reason="share")
    return _interpolate(basis, 0, prime)


def split(secret: bytes, threshold: int, count: int) -> list[tuple[int, bytes]]:
    """Shares (index, 66-byte value) of a secret of up to 64 bytes (its length is not hidden: callers share
    fixed-size secrets)."""
    if len(secret) > MAX_SECRET_BYTES:
        raise SecAggError(f"secrets of at most {MAX_SECRET_BYTES} bytes can be shared, got {len(secret)}")
    # a leading 0x01 keeps leading zero bytes of the secret
    value = int.from_bytes(b"\x01" + secret, "big")
    return [(x, y.to_bytes(SHARE_BYTES, "big")) for x, y in split_int(value, threshold, count)]


def reconstruct(shares: Sequence[tuple[int, bytes]], threshold: int) -> bytes:
    """The secret from at least ``threshold`` (index, value) shares (see ``reconstruct_int``)."""
    points = []
    for x, y in shares:
        if len(y) != SHARE_BYTES:
            raise SecAggError(f"share {x} has {len(y)} bytes, expected {SHARE_BYTES}", reason="share")
        points.append((int(x), int.from_bytes(y, "big")))
    value = reconstruct_int(points, threshold)
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if not raw or raw[0] != 1 or len(raw) > MAX_SECRET_BYTES + 1:
        raise SecAggError("the shares do not reconstruct a valid secret: a share is wrong", reason="share")
    return raw[1:]
