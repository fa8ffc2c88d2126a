"""Clients of mixed LoRA ranks: products averaged exactly, re-factorised to the global rank by SVD."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.aggregate import HeteroRankFedAvg
from edgeft.aggregate.lora_ranks import lora_pairs, lora_product, refactorise, truncate
from edgeft.errors import ConfigError
from edgeft.update import AdapterUpdate

A, B = "layer.q.lora_A.default.weight", "layer.q.lora_B.default.weight"
HEAD = "classifier.weight"


def adapter(a, b, head) -> dict[str, np.ndarray]:  # noqa: ANN001
    return {A: np.array(a, np.float32), B: np.array(b, np.float32), HEAD: np.array(head, np.float32)}


def test_pairs_are_found_by_peft_names():
    assert lora_pairs([A, B, HEAD]) == {"layer.q": (A, B)}
    with pytest.raises(ConfigError, match="no matching"):
        lora_pairs([A, HEAD])


def test_two_ranks_by_hand():
    """alpha = 1. Client 1, rank 1 (scale 1): dW1 = [[2, 0], [0, 0]]; client 2, rank 2 (scale 1/2):
    dW2 = 0.5 * diag(0, 4) = [[0, 0], [0, 2]]. With 1 and 3 examples the mean is diag(0.5, 1.5)."""
    one = AdapterUpdate(adapter([[1, 0]], [[2], [0]], [1.0]), 1)
    two = AdapterUpdate(adapter([[1, 0], [0, 1]], [[0, 0], [0, 4]], [5.0]), 3)
    mean = np.diag([0.5, 1.5])
    for rank in (1, 2):
        strategy = HeteroRankFedAvg(rank=rank, alpha=1.0)
        aggregation = strategy.start(adapter(np.zeros((rank, 2)), np.zeros((2, rank)), [0.0]))
        aggregation.add(one)
        aggregation.add(two)
        result = aggregation.result()
        assert result[HEAD][0] == pytest.approx((1 + 15) / 4)  # other tensors: FedAvg
        product = lora_product(result[A], result[B], 1.0 / rank)
        expected = mean if rank == 2 else np.diag([0.0, 1.5])  # rank 1: the best rank-1 approximation
        np.testing.assert_allclose(product, expected, atol=1e-6)
        np.testing.assert_allclose(result[A] @ result[A].T, np.eye(rank), atol=1e-6)  # A = V^T: orthonormal rows
        assert aggregation.report() == {"updates": 2, "client_ranks": [1, 2], "global_rank": rank}


def test_refactorise_keeps_a_alive_where_the_products_are_zero():
    """Components no client filled restart like a fresh LoRA: A non-zero (orthonormal), B zero."""
    a, b = refactorise(np.zeros((3, 5)), 2, 8.0)
    np.testing.assert_allclose(a @ a.T, np.eye(2), atol=1e-6)
    np.testing.assert_array_equal(b, np.zeros((3, 2)))


def test_mixed_ranks_average_products_exactly_when_the_global_rank_suffices():
    rng = np.random.default_rng(0)
    out_dim, in_dim, alpha = 6, 5, 16.0
    ranks, counts = (1, 2, 4), (10, 30, 60)
    updates, mean = [], np.zeros((out_dim, in_dim))
    for rank, count in zip(ranks, counts):
        a, b = rng.normal(size=(rank, in_dim)), rng.normal(size=(out_dim, rank))
        updates.append(AdapterUpdate(adapter(a, b, [0.0]), count))
        mean += count * (alpha / rank) * b.astype(np.float32) @ a.astype(np.float32)
    mean /= sum(counts)
    strategy = HeteroRankFedAvg(rank=5, alpha=alpha)  # the mean has rank <= 5 = min(out, in)
    aggregation = strategy.start(adapter(np.zeros((5, in_dim)), np.zeros((out_dim, 5)), [0.0]))
    for update in updates:
        aggregation.add(update)
    result = aggregation.result()
    np.testing.assert_allclose(lora_product(result[A], result[B], alpha / 5), mean, rtol=1e-4, atol=1e-4)
    # a rank-2 client starts from the best rank-2 approximation of the global change, in its own scale
    client = strategy.for_client(result, 2)
    assert client[A].shape == (2, in_dim) and client[B].shape == (out_dim, 2)
    u, s, vt = np.linalg.svd(mean)
    np.testing.assert_allclose(lora_product(client[A], client[B], alpha / 2), (u[:, :2] * s[:2]) @ vt[:2],
                               rtol=1e-4, atol=1e-4)


def test_truncate_rescales_b_to_the_client_scale():
    tensors = adapter([[1, 0], [0, 1]], [[3, 0], [0, 1]], [0.0])
    cut = truncate(tensors, 1, global_scale=0.5, scale=1.0)
    np.testing.assert_allclose(lora_product(cut[A], cut[B], 1.0), [[1.5, 0], [0, 0]])
