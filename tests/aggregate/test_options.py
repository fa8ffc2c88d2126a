"""[job.strategy_options]: typed, and a bad, unknown or misplaced key names itself."""

from __future__ import annotations

import pytest

from edgeft.aggregate import STRATEGIES, STRATEGY_NAMES, StrategyOptions, build_strategy, parse_strategy_options
from edgeft.errors import ConfigError


def test_every_named_strategy_is_registered_and_builds():
    assert tuple(STRATEGIES) == STRATEGY_NAMES
    for name in STRATEGY_NAMES:
        assert build_strategy(name).name == name


def test_options_are_typed():
    options = parse_strategy_options("fedadam", {"server_lr": 0.05, "beta2": 0.999, "tau": 1e-4})
    assert options == StrategyOptions(server_lr=0.05, beta2=0.999, tau=1e-4)
    assert parse_strategy_options("multikrum", {"byzantine": 2, "selected": 5}).selected == 5
    assert parse_strategy_options("fedavg", {"clip_norm": 1.0, "noise_multiplier": 0.8}).private


@pytest.mark.parametrize("strategy, raw, message", [
    ("fedadam", {"server_lr": 0}, "server_lr=0: must be positive"),
    ("fedadam", {"beta1": 1.0}, r"beta1=1.0: must be in \[0, 1\)"),
    ("fedyogi", {"tau": -1.0}, "tau=-1.0"),
    ("trimmed_mean", {"trim": 0.5}, r"trim=0.5: must be in \[0, 0.5\)"),
    ("krum", {"byzantine": 1.5}, "byzantine=1.5: must be an integer"),
    ("krum", {"byzantine": True}, "byzantine=True"),
    ("fedavg", {"clip_norm": "1"}, "clip_norm='1'"),
    ("fedavg", {"noise_multiplier": 1.0}, "needs clip_norm"),
    ("fedavg", {"clip_norm": 1.0, "noise_multiplier": 1.0, "dp_delta": 1.0}, "dp_delta=1.0"),
    ("fedavg", {"trim": 0.1}, "trim does not apply to strategy 'fedavg' .*trimmed_mean"),
    ("median", {"clip_norm": 1.0}, "clip_norm does not apply to strategy 'median'"),
    ("fedadagrad", {"beta2": 0.9}, "beta2 does not apply to strategy 'fedadagrad'"),
    ("fedadam", {"lr": 0.1}, "unknown job.strategy_options.lr; strategy 'fedadam' takes server_lr, beta1"),
    ("fedsgd", {}, "invalid job.strategy='fedsgd': expected one of fedavg"),
])
def test_bad_options_name_the_field(strategy, raw, message):
    with pytest.raises(ConfigError, match=message):
        build_strategy(strategy, raw)
