"""Aggregation strategies: a ``Strategy`` configures a round and aggregates its updates.

Each algorithm lives in its own module with its arithmetic in small pure numpy functions:
``fedavg`` (FedAvg, FedProx), ``fedopt`` (FedAdam, FedYogi, FedAdagrad), ``robust`` (median, trimmed mean,
Krum, multi-Krum), ``delta`` and ``privacy`` (norm clipping, client-level differential privacy),
``lora_ranks`` (clients of mixed LoRA ranks), ``fedbuff`` (asynchronous buffers weighted by staleness: the
arithmetic only, not a registered strategy).
"""

from __future__ import annotations

from edgeft.aggregate.base import Aggregation, Partial, RoundContext, Strategy, Summable, select_clients
from edgeft.aggregate.fedavg import FedAvg, FedProx, WeightedMean, weighted_mean
from edgeft.aggregate.fedbuff import BufferedUpdate, FedBuffOptions, aggregate_buffer
from edgeft.aggregate.fedopt import FedAdagrad, FedAdam, FedYogi
from edgeft.aggregate.lora_ranks import HeteroRankFedAvg
from edgeft.aggregate.options import StrategyOptions
from edgeft.aggregate.registry import STRATEGIES, STRATEGY_NAMES, build_strategy, parse_strategy_options
from edgeft.aggregate.robust import Krum, Median, MultiKrum, TrimmedMean

__all__ = ["Aggregation", "BufferedUpdate", "FedAdagrad", "FedAdam", "FedAvg", "FedBuffOptions", "FedProx", "FedYogi",
           "HeteroRankFedAvg", "Krum", "Median", "MultiKrum", "Partial", "RoundContext", "STRATEGIES",
           "STRATEGY_NAMES", "Strategy", "StrategyOptions", "Summable", "TrimmedMean", "WeightedMean",
           "aggregate_buffer", "build_strategy", "parse_strategy_options", "select_clients", "weighted_mean"]
