"""server/artifacts.py: the decoded-versions cache (the stores themselves are exercised by every coordinator test,
on a folder and on an S3 bucket: test_s3.py, test_running_sums.py)."""

from __future__ import annotations

import numpy as np

from edgeft.server.artifacts import DecodedCache


def tensors(value: float, n: int = 1024) -> dict[str, np.ndarray]:
    return {"w": np.full(n, value, dtype=np.float32)}  # 4 kB


def test_the_least_recently_used_versions_go_beyond_the_byte_budget_and_the_latest_always_stays():
    cache = DecodedCache(max_bytes=3 * 4096)
    for version in range(3):
        cache.put(("job", version), tensors(version))
    assert cache.get(("job", 0))["w"][0] == 0  # used again: now the most recent
    cache.put(("job", 3), tensors(3))  # over budget: version 1, the least recently used, goes
    assert cache.get(("job", 1)) is None
    assert [cache.get(("job", v))["w"][0] for v in (0, 2, 3)] == [0, 2, 3]
    assert cache.get(("other", 0)) is None

    small = DecodedCache(max_bytes=100)  # smaller than one adapter: it still keeps the latest
    small.put(("job", 1), tensors(1))
    small.put(("job", 2), tensors(2))
    assert small.get(("job", 1)) is None and small.get(("job", 2))["w"][0] == 2


def test_taken_tensors_are_kept_no_longer_and_free_their_bytes():
    cache = DecodedCache(max_bytes=2 * 4096)
    cache.put(("job", "a"), tensors(1))
    cache.put(("job", "a"), tensors(2))  # the same key again: counted once
    cache.put(("job", "b"), tensors(3))
    assert cache.take(("job", "a"))["w"][0] == 2 and cache.take(("job", "a")) is None
    cache.put(("job", "c"), tensors(4))  # a's bytes were freed: b stays
    assert [cache.get(("job", k))["w"][0] for k in "bc"] == [3, 4]
