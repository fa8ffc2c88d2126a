"""Split one labelled data set into per-client partitions, reproducibly from a seed.

Schemes (the ``--partition`` flag of ``edgeft simulate``):

- ``iid``: a random permutation cut into near-equal parts.
- ``dirichlet:ALPHA``: label skew. For each class, its examples are divided among the clients in proportions
  drawn from Dirichlet(ALPHA); small ALPHA gives each client few classes. Draws are repeated (up to 100 times)
  until every client holds at least ``min_size`` examples. This is the scheme of Hsu et al. (2019) and of
  Flower Datasets' ``DirichletPartitioner``.
- ``shards:K``: examples sorted by label, cut into ``clients * K`` shards, each client gets K random shards
  (McMahan et al., 2017).
"""

from __future__ import annotations

import numpy as np

from edgeft.errors import ConfigError, DataError

SCHEMES = ("iid", "dirichlet", "shards")


def parse_scheme(scheme: str) -> tuple[str, float]:
    """``"dirichlet:0.5"`` -> ("dirichlet", 0.5); ``"iid"`` -> ("iid", 0.0)."""
    name, _, arg = scheme.partition(":")
    if name not in SCHEMES:
        raise ConfigError(f"invalid partition {scheme!r}: expected iid, dirichlet:ALPHA or shards:K")
    if name == "iid":
        if arg:
            raise ConfigError(f"invalid partition {scheme!r}: iid takes no argument")
        return name, 0.0
    try:
        value = float(arg)
    except ValueError:
        raise ConfigError(f"invalid partition {scheme!r}: {name} needs a number, e.g. "
                          f"{'dirichlet:0.5' if name == 'dirichlet' else 'shards:2'}") from None
    if value <= 0 or (name == "shards" and value != int(value)):
        raise ConfigError(f"invalid partition {scheme!r}: {'ALPHA must be > 0' if name == 'dirichlet' else 'K must be a positive integer'}")
    return name, value


def partition(labels: np.ndarray, clients: int, scheme: str = "iid", seed: int = 0,
              min_size: int = 10) -> list[np.ndarray]:
    """Indices into ``labels`` for each of ``clients`` partitions (disjoint, covering every example)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"partitioning needs one class label per example, got labels of shape {labels.shape}")
    if clients < 1:
        raise ConfigError(f"invalid clients={clients}: must be >= 1")
    if clients * max(min_size, 1) > len(labels):
        raise DataError(f"{len(labels)} examples cannot give {clients} clients {min_size} examples each; "
                        "use fewer clients or more data")
    name, value = parse_scheme(scheme)
    rng = np.random.default_rng(seed)
    if name == "iid":
        parts = np.array_split(rng.permutation(len(labels)), clients)
    elif name == "shards":
        k = int(value)
        order = np.argsort(labels, kind="stable")
        shards = np.array_split(order, clients * k)
        pick = rng.permutation(clients * k).reshape(clients, k)
        parts = [np.concatenate([shards[s] for s in row]) for row in pick]
    else:
        parts = _dirichlet(labels, clients, value, rng, min_size)
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator,
               min_size: int) -> list[np.ndarray]:
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in classes:
            index = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * len(index)).astype(int)
            for client, piece in enumerate(np.split(index, cuts)):
                parts[client].append(piece)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return merged
    raise DataError(f"dirichlet:{alpha} gave some client fewer than {min_size} examples in 100 draws; "
                    "raise ALPHA or use fewer clients")


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], n_classes: int) -> np.ndarray:
    """[clients, classes] example counts: the label skew of a partition."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=n_classes) for p in parts])
