"""Shamir secret sharing: every subset of at least t shares reconstructs; t - 1 shares are uniformly
distributed whatever the secret (checked exhaustively in a small field); wrong, duplicate or too few
shares are refused."""

from __future__ import annotations

import itertools
import os
from collections import Counter

import pytest

from edgeft.errors import SecAggError
from edgeft.secagg import shamir


def is_probable_prime(n: int) -> bool:
    """Miller-Rabin with 40 fixed bases."""
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 101,
              103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167, 173):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_the_field_is_prime():
    assert is_probable_prime(shamir.PRIME)


@pytest.mark.parametrize("count", range(1, 8))
def test_every_subset_of_at_least_t_shares_reconstructs(count):
    for threshold in range(1, count + 1):
        secret = os.urandom(32)
        shares = shamir.split(secret, threshold, count)
        for size in range(threshold, count + 1):
            for subset in itertools.combinations(shares, size):
                assert shamir.reconstruct(list(subset), threshold) == secret


def test_leading_zero_bytes_and_empty_secrets_survive():
    for secret in (b"\x00" * 32, b"\x00\x01", b"", b"\xff" * 64):
        assert shamir.reconstruct(shamir.split(secret, 2, 3)[1:], 2) == secret


def test_t_minus_one_shares_say_nothing_exhaustive_small_field():
    """In GF(11) with t = 3 of n = 4: over every polynomial, the joint distribution of any 2 shares is the same
    (uniform) for every secret."""
    prime, threshold = 11, 3
    for xs in itertools.combinations(range(1, 5), threshold - 1):
        distributions = []
        for secret in range(prime):
            seen = Counter()
            for a1, a2 in itertools.product(range(prime), repeat=2):
                seen[tuple((secret + a1 * x + a2 * x * x) % prime for x in xs)] += 1
            distributions.append(seen)
        assert all(d == distributions[0] for d in distributions)
        assert len(distributions[0]) == prime ** 2 and set(distributions[0].values()) == {1}


def test_small_field_split_and_reconstruct_exhaustively():
    prime = 13
    for secret in range(prime):
        shares = shamir.split_int(secret, 3, 5, prime)
        for subset in itertools.combinations(shares, 3):
            assert shamir.reconstruct_int(list(subset), 3, prime) == secret


def test_too_few_duplicate_and_wrong_shares_are_refused():
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, 5)
    with pytest.raises(SecAggError, match="cannot reconstruct"):
        shamir.reconstruct(shares[:2], 3)
    with pytest.raises(SecAggError, match="duplicate"):
        shamir.reconstruct([shares[0], shares[0], shares[1]], 3)
    x, y = shares[4]
    tampered = shares[:4] + [(x, (int.from_bytes(y, "big") ^ 1).to_bytes(shamir.SHARE_BYTES, "big"))]
    with pytest.raises(SecAggError, match="does not lie on the polynomial"):
        shamir.reconstruct(tampered, 3)
    with pytest.raises(SecAggError, match="bytes"):
        shamir.reconstruct([(1, b"short"), *shares[1:3]], 3)
    with pytest.raises(SecAggError, match="not a point"):
        shamir.reconstruct_int([(0, 5), (1, 2), (2, 3)], 3)
    # exactly t shares with one wrong: undetectable by Shamir alone, but almost surely not a valid secret
    # encoding (the 0x01 marker byte); the protocol checks commitments and public keys besides
    wrong = [shares[0], shares[1], (shares[2][0], os.urandom(shamir.SHARE_BYTES))]
    try:
        assert shamir.reconstruct(wrong, 3) != secret
    except SecAggError:
        pass


def test_bad_parameters_are_refused():
    with pytest.raises(SecAggError, match="threshold"):
        shamir.split(b"x", 4, 3)
    with pytest.raises(SecAggError, match="at most 64"):
        shamir.split(b"x" * 65, 2, 3)
