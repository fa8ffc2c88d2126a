"""A device given several coordinator addresses (``--server a:PORT,b:PORT``, replicas): gRPC's round-robin policy
spreads its calls over the ones that answer and moves on from one that does not."""

from __future__ import annotations

import pytest

from edgeft.client.transport import channel_target
from edgeft.errors import ConfigError
from edgeft.testing.ports import free_port

from conftest_server import agent, enrol, start


def test_one_address_is_used_as_given_and_several_are_resolved_for_round_robin():
    assert channel_target("coordinator.example:50051") == ("coordinator.example:50051", [], None)
    target, options, name = channel_target("localhost:50051, 127.0.0.2:50052")
    assert target.startswith("ipv4:") and "127.0.0.1:50051" in target and target.endswith("127.0.0.2:50052")
    assert options == [("grpc.lb_policy_name", "round_robin")] and name == "localhost"  # what TLS must see named
    assert channel_target("dns:///coordinators.example:50051")[1] == [("grpc.lb_policy_name", "round_robin")]
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        channel_target("127.0.0.1:50051,127.0.0.1")
    with pytest.raises(ConfigError, match="cannot resolve"):
        channel_target("127.0.0.1:50051,no-such-host.invalid:50051")


def test_devices_reach_the_coordinator_that_answers_when_another_address_is_down(tmp_path, tiny_bundle, shards):
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=1, minimum=2)
    dead = free_port()  # nothing listens there: a replica that is down
    try:
        token = enrol(coordinator, tmp_path)
        procs = [agent(port, shard, tmp_path / f"device{i}", token, "--server", f"127.0.0.1:{dead},localhost:{port}")
                 for i, shard in enumerate(shards[:2])]
        outputs = [p.communicate(timeout=240)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        assert coordinator.job_status("banking")["status"] == "finished"
        assert len(coordinator.round_updates("banking", 1)) == 2
    finally:
        server.stop(grace=None)
