"""Aggregating LoRA adapters whose ranks differ between clients (devices with less memory train a smaller
rank), by averaging the products and re-factorising them (as FlexLoRA, Bai et al., 2024, does).

A LoRA pair (A [r, in], B [out, r], scale s = alpha / r as PEFT applies it) stands for the weight change
dW = s * B @ A. For each pair the aggregate is the example-weighted mean of the clients' dW_i, exactly,
whatever their ranks; it is then re-factorised to the global rank R with a truncated SVD
dW ~ U_R S_R V_R^T (the best rank-R approximation, Eckart-Young):

    A = V_R^T                 (orthonormal rows)
    B = U_R S_R / s_R

A keeps unit-norm rows so that components the clients did not fill (zero singular values) restart like a
fresh LoRA initialisation, A non-zero and B zero, instead of freezing with both factors at zero. A client of
rank r < R starts the next round from the first r components, B rescaled by s_R / s_r: its own product is
then the best rank-r approximation of the global dW.

Why not zero-padding A and B to the largest rank and averaging factors? Averaging factors is already
inexact for equal ranks (mean(B) @ mean(A) != mean(B @ A)); with unequal ranks the padded zeros also
dilute the higher components towards zero, and with PEFT's scale alpha / r the same factors mean different
weight changes at different ranks. Products are exact; the SVD costs O(out * in * min(out, in)) per pair
and round (0.05 s for a 384 x 384 MiniLM projection), and the running sums take one dense out x in matrix
per pair in float64 (14 MB for MiniLM's 12 query/value projections) rather than one adapter.

Other trainable tensors (a classification head, say) are averaged as in FedAvg.

The coordinator serves a job's smaller ranks as bundles of their own ([job] device_ranks or device_bundles,
checked by ``check_rank_bundle``; ``check_engine_bundle`` checks a job's bundles for other training engines the
same way); a device asking for at most rank r (``edgeft client --max-lora-rank``)
trains the largest served rank <= r from ``truncate``-d global adapters, and ``HeteroRankMean`` aggregates.
"""

from __future__ import annotations

import numpy as np

from edgeft.aggregate.base import Aggregation, RoundContext, Strategy
from edgeft.errors import ConfigError
from edgeft.update import AdapterUpdate


def lora_pairs(names: list[str]) -> dict[str, tuple[str, str]]:
    """{module: (A name, B name)} for the PEFT-named LoRA tensors among ``names`` (``...lora_A...``)."""
    pairs = {}
    for name in names:
        if ".lora_A." in name:
            partner = name.replace(".lora_A.", ".lora_B.")
            if partner not in names:
                raise ConfigError(f"LoRA tensor {name} has no matching {partner}")
            pairs[name.split(".lora_A.")[0]] = (name, partner)
    return pairs


def lora_product(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """dW = scale * B @ A in float64."""
    return scale * (b.astype(np.float64) @ a.astype(np.float64))


def refactorise(delta_w: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(A [rank, in], B [out, rank]) with scale * B @ A the best rank-``rank`` approximation of ``delta_w``;
    A = V^T (orthonormal rows), B = U S / scale."""
    u, s, vt = np.linalg.svd(delta_w, full_matrices=True)
    out_dim, in_dim = delta_w.shape
    if rank > min(out_dim, in_dim):
        raise ConfigError(f"rank {rank} exceeds the {out_dim} x {in_dim} matrix it factorises")
    return vt[:rank].astype(np.float32), (u[:, :rank] * (s[:rank] / scale)).astype(np.float32)


def truncate(tensors: dict[str, np.ndarray], rank: int, global_scale: float, scale: float) -> dict[str, np.ndarray]:
    """A global adapter cut to a client's ``rank`` (its PEFT scale ``scale``): the first ``rank``
    components, B rescaled so that scale * B_r @ A_r = global_scale * B[:, :r] @ A[:r]."""
    out = dict(tensors)
    for a_name, b_name in lora_pairs(list(tensors)).values():
        out[a_name] = np.ascontiguousarray(tensors[a_name][:rank])
        out[b_name] = np.ascontiguousarray(tensors[b_name][:, :rank] * (global_scale / scale)).astype(np.float32)
    return out


def adapter_rank(manifest) -> int:  # noqa: ANN001
    """A bundle's LoRA rank (its manifest's adapter section); 0 for another kind of adapter."""
    adapter = manifest.adapter or {}
    return int(adapter.get("rank") or 0) if adapter.get("kind") == "lora" else 0


# What two bundles of one job share whatever their LoRA rank or engine: manifest fields, then adapter keys.
SAME_JOB_FIELDS = ("task", "labels", "inputs", "proximal", "pooling", "loss", "optimizer", "tokenizer")
SAME_JOB_ADAPTER_KEYS = ("kind", "alpha", "target_modules", "trainable_modules", "dropout")


def _check_same_job(main, other, rank: int, differs) -> None:  # noqa: ANN001
    """ConfigError (``differs(what)``) unless ``other`` is ``main``'s model with ``main``'s settings, its LoRA
    tensors at ``rank``: the same base model, SAME_JOB_FIELDS, SAME_JOB_ADAPTER_KEYS, and trainable tensors of
    the same names and dtypes whose shapes differ at most in the LoRA rank."""
    if main.base_model.get("digest") != other.base_model.get("digest"):
        raise differs("its base model (manifest base_model.digest)")
    for field in SAME_JOB_FIELDS:
        if getattr(main, field) != getattr(other, field):
            raise differs(field)
    for key in SAME_JOB_ADAPTER_KEYS:
        if main.adapter.get(key) != other.adapter.get(key):
            raise differs(f"adapter.{key}")
    mine = {t.name: t for t in main.trainable}
    theirs = {t.name: t for t in other.trainable}
    if set(mine) != set(theirs):
        raise differs("its trainable tensors' names")
    for name, spec in mine.items():
        shape = [rank if ".lora_A." in name and i == 0 or ".lora_B." in name and i == 1 else d
                 for i, d in enumerate(spec.shape)]
        if list(theirs[name].shape) != shape or theirs[name].dtype != spec.dtype:
            raise differs(f"tensor {name}'s shape {theirs[name].shape} (expected {shape})")


def check_rank_bundle(main, other) -> int:  # noqa: ANN001
    """``other``'s rank, after checking that its bundle (manifest) is ``main``'s model at a smaller LoRA rank:
    the same training engine, base model, task, labels, inputs, loss, optimizer, tokenizer, LoRA alpha and target
    modules, FedProx term and pooling, and trainable tensors of the same names whose shapes differ only in the
    LoRA rank. ConfigError otherwise."""
    rank, main_rank = adapter_rank(other), adapter_rank(main)
    if not (rank and main_rank):
        raise ConfigError("mixed ranks need LoRA bundles; these adapters are "
                          f"{main.adapter.get('kind')!r} and {other.adapter.get('kind')!r}")

    def differs(what: str) -> ConfigError:
        return ConfigError(f"the rank-{rank} bundle differs from the job's rank-{main_rank} bundle in {what}: "
                           "export it from the same model with the same settings, changing only the LoRA rank")

    if rank >= main_rank:
        raise ConfigError(f"a device bundle's LoRA rank must be below the job's rank {main_rank}; it is {rank}")
    if main.engine != other.engine:
        raise differs(f"its training engine ({other.engine!r}, the job's is {main.engine!r}; a job serves smaller "
                      "ranks of its own engine only)")
    _check_same_job(main, other, rank, differs)
    return rank


def check_engine_bundle(main, other) -> str:  # noqa: ANN001
    """``other``'s training engine, after checking that its bundle (manifest) is ``main``'s model exported for
    another engine: everything ``check_rank_bundle`` compares, at the same LoRA rank (the whole adapter section
    equal), so that updates of either bundle are the same tensors. ConfigError otherwise."""
    if other.engine == main.engine:
        raise ConfigError(f"an engine bundle must be for another engine than the job's bundle; both are for "
                          f"{main.engine!r}")

    def differs(what: str) -> ConfigError:
        return ConfigError(f"the {other.engine!r} bundle differs from the job's {main.engine!r} bundle in {what}: "
                           "export it from the same model with the same settings, changing only the engine "
                           "(edgeft export --engine)")

    if main.adapter != other.adapter:
        keys = sorted(k for k in set(main.adapter) | set(other.adapter) if main.adapter.get(k) != other.adapter.get(k))
        raise differs("its adapter section (" + "; ".join(
            f"{k}: {other.adapter.get(k)!r}, the job's {main.adapter.get(k)!r}" for k in keys) + ")")
    _check_same_job(main, other, adapter_rank(main), differs)
    return other.engine


class HeteroRankMean(Aggregation):
    """Streaming: per LoRA pair sum_i n_i * s_i * B_i @ A_i, other tensors sum_i n_i * x_i; the result is
    re-factorised to ``rank`` (see the module docstring). Each update's rank is read from its A's rows."""

    def __init__(self, global_adapter: dict[str, np.ndarray], rank: int, alpha: float):
        self.template = global_adapter
        self.rank, self.alpha = rank, alpha
        self.pairs = lora_pairs(list(global_adapter))
        in_pair = {n for pair in self.pairs.values() for n in pair}
        self.products = {m: np.zeros((global_adapter[b].shape[0], global_adapter[a].shape[1]))
                         for m, (a, b) in self.pairs.items()}
        self.others = {n: np.zeros(v.shape) for n, v in global_adapter.items() if n not in in_pair}
        self.weight = 0.0
        self.ranks: list[int] = []

    def add(self, update: AdapterUpdate) -> None:
        weight = float(update.n_examples)
        ranks = {update.tensors[a].shape[0] for a, _ in self.pairs.values()}
        if len(ranks) > 1:
            raise ConfigError(f"an update mixes LoRA ranks {sorted(ranks)}; one rank per client is supported")
        rank = ranks.pop() if ranks else self.rank
        for module, (a, b) in self.pairs.items():
            self.products[module] += weight * lora_product(update.tensors[a], update.tensors[b], self.alpha / rank)
        for name in self.others:
            self.others[name] += weight * update.tensors[name].astype(np.float64)
        self.weight += weight
        self.ranks.append(rank)

    def result(self) -> dict[str, np.ndarray]:
        if self.weight <= 0:
            raise ConfigError("no updates to average")
        out = {n: (v / self.weight).astype(np.float32) for n, v in self.others.items()}
        for module, (a, b) in self.pairs.items():
            out[a], out[b] = refactorise(self.products[module] / self.weight, self.rank, self.alpha / self.rank)
        return out

    def report(self) -> dict:
        return {"updates": len(self.ranks), "client_ranks": sorted(set(self.ranks)), "global_rank": self.rank}


class HeteroRankFedAvg(Strategy):
    """FedAvg over LoRA clients of mixed ranks (mean of products, SVD back to ``rank``); library use."""

    name = "fedavg_hetero_rank"

    def __init__(self, rank: int, alpha: float):
        if rank < 1 or alpha <= 0:
            raise ConfigError(f"invalid rank={rank} or alpha={alpha}: rank >= 1, alpha > 0")
        self.rank, self.alpha = rank, alpha

    def start(self, global_adapter: dict[str, np.ndarray], context: RoundContext | None = None) -> Aggregation:
        return HeteroRankMean(global_adapter, self.rank, self.alpha)

    def for_client(self, global_adapter: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
        """The global adapter as a rank-``rank`` client starts from it."""
        return truncate(global_adapter, rank, self.alpha / self.rank, self.alpha / rank)
