"""Device heterogeneity (edgeft.testing.fleet_profile): seeded profiles are reproducible, a slow device's task takes
longer (a lightweight device's and a real agent's), dropouts happen at about their rate, devices are online only in
their windows, and bad settings name the field."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edgeft.config import TrainConfig
from edgeft.errors import ConfigError
from edgeft.testing.agents import AgentSpec
from edgeft.testing.fleet_profile import DeviceProfile, FleetProfile, ProfiledConditions
from edgeft.wire import Task


def test_the_same_seed_gives_the_same_fleet_and_another_seed_another():
    fleet = FleetProfile(speed_sigma=1.0, availability=0.5, dropout=0.1, seed=7)
    first = [fleet.device(i) for i in range(20)]
    again = [FleetProfile(speed_sigma=1.0, availability=0.5, dropout=0.1, seed=7).device(i) for i in range(20)]
    assert [(d.slowdown, d.windows, d.seed) for d in first] == [(d.slowdown, d.windows, d.seed) for d in again]
    assert [[d.drops() for _ in range(50)] for d in first] == [[d.drops() for _ in range(50)] for d in again]
    other = [FleetProfile(speed_sigma=1.0, seed=8).device(i).slowdown for i in range(20)]
    assert other != [d.slowdown for d in first]


def test_slowdowns_are_log_normal_with_the_given_sigma():
    slowdowns = np.array([FleetProfile(speed_sigma=1.0, seed=3).device(i).slowdown for i in range(4000)])
    logs = np.log(slowdowns)
    assert abs(logs.mean()) < 0.1 and 0.9 < logs.std() < 1.1  # N(0, 1): standard errors 0.016 and 0.011
    assert all(FleetProfile().device(i).slowdown == 1.0 for i in range(5))


def test_dropouts_happen_at_about_their_rate():
    fleet = FleetProfile(dropout=0.2, seed=5)
    draws = [fleet.device(i).drops() for i in range(200) for _ in range(25)]  # 5,000 tasks: sd of the rate 0.006
    assert 0.17 < np.mean(draws) < 0.23
    assert not any(FleetProfile().device(0).drops() for _ in range(100))


def test_a_device_is_online_for_its_share_of_every_period():
    device = FleetProfile(availability=0.25, period_s=100.0, seed=2).device(0)
    online = [device.seconds_until_online(t / 10) == 0 for t in range(0, 3000)]  # three periods, 0.1 s steps
    assert 0.24 < np.mean(online) < 0.26
    start, end = device.windows[0]
    waiting = (end + 1) % 100.0
    assert device.seconds_until_online(waiting) == pytest.approx(100.0 - (end + 1 - start), abs=1e-9)


def test_shared_windows_and_wrapping():
    device = FleetProfile(windows=((0.0, 10.0), (50.0, 60.0)), period_s=100.0).device(4)
    assert device.seconds_until_online(5.0) == 0 and device.seconds_until_online(20.0) == 30.0
    assert device.seconds_until_online(70.0) == 30.0 and device.seconds_until_online(155.0) == 0
    wrapped = DeviceProfile(period_s=100.0, windows=((90.0, 120.0),))
    assert wrapped.seconds_until_online(95.0) == 0 and wrapped.seconds_until_online(10.0) == 0
    assert wrapped.seconds_until_online(30.0) == 60.0


def test_a_slow_device_waits_after_training_in_proportion():
    fast = ProfiledConditions(DeviceProfile(slowdown=0.5))
    slow = ProfiledConditions(DeviceProfile(slowdown=3.0))
    assert fast.profile.extra_seconds(1.0) == 0.0 and slow.profile.extra_seconds(1.0) == 2.0
    started = time.monotonic()
    slow.after_training(0.1)
    assert 0.19 < time.monotonic() - started < 1.0


def test_a_device_profile_travels_to_the_agent_process_as_json():
    profile = FleetProfile(speed_sigma=1.0, availability=0.5, dropout=0.3, seed=1).device(3)
    back = DeviceProfile.from_json(profile.to_json())
    assert (back.slowdown, back.windows, back.dropout, back.seed) == (profile.slowdown, profile.windows, 0.3,
                                                                      profile.seed)
    spec = AgentSpec(("--server", "s"), profile=profile.to_json(), started=12.5)
    assert spec.command()[1:] == ["-m", "edgeft.testing.fleet_profile", "--device-profile", profile.to_json(),
                                  "--fleet-started", "12.5", "--server", "s"]
    both = AgentSpec(("--server", "s"), attack="scaled:10", profile=profile.to_json(), started=1.0).command()
    assert both[1:3] == ["-m", "edgeft.testing.byzantine"] and "--device-profile" in both


def test_the_real_agent_abandons_a_dropped_task(tmp_path):
    from edgeft.client.agent import Agent, AgentConfig
    from edgeft.client.transport import Transport

    class Always(ProfiledConditions):
        def drops(self) -> bool:
            return True

    agent = Agent(AgentConfig(server="127.0.0.1:1", data=tmp_path / "d.csv", cache_dir=tmp_path,
                              transport=Transport(token="t", insecure=True)),
                  conditions=Always(DeviceProfile()))
    task = Task("job", 3, "digest", TrainConfig(progress=False), {})
    agent.handle(task)  # would fail fetching the bundle if it trained
    assert agent.rounds_dropped == [("job", 3)] and agent.rounds_done == []


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match="invalid dropout=1.0"):
        FleetProfile(dropout=1.0)
    with pytest.raises(ConfigError, match="invalid speed_sigma=-1"):
        FleetProfile(speed_sigma=-1)
    with pytest.raises(ConfigError, match="invalid windows"):
        FleetProfile(windows=((5.0, 2.0),))
    with pytest.raises(ConfigError, match="availability or windows"):
        FleetProfile(windows=((0.0, 2.0),), availability=0.5)


def test_simulate_flags_become_the_fleet_and_the_mode():
    import argparse

    from edgeft.commands.fleet import add_fleet_arguments, fleet_settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    add_fleet_arguments(parser)
    settings = fleet_settings(parser.parse_args(["--speed-sigma", "1", "--dropout", "0.1", "--availability", "0.5",
                                                 "--seed", "3", "--mode", "async", "--buffer-size", "4"]))
    assert settings["fleet"] == FleetProfile(speed_sigma=1.0, dropout=0.1, availability=0.5, seed=3)
    assert settings["mode"] == "async" and settings["async_options"] == {"buffer_size": 4}
    with pytest.raises(ConfigError, match="--buffer-size applies to --mode async only"):
        fleet_settings(parser.parse_args(["--buffer-size", "4"]))
