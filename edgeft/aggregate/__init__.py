"""Aggregation strategies: a ``Strategy`` configures a round and aggregates its updates.

Each algorithm lives in its own module with its arithmetic in small pure numpy functions.
"""

from __future__ import annotations

from edgeft.aggregate.base import Aggregation, Strategy, select_clients
from edgeft.aggregate.fedavg import FedAvg, WeightedMean, weighted_mean

__all__ = ["Aggregation", "FedAvg", "Strategy", "WeightedMean", "select_clients", "weighted_mean"]
