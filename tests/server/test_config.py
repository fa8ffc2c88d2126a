"""Job files: a bundle or a model to export, validation that names the bad field."""

from __future__ import annotations

import json
import shutil

import pytest

from edgeft.errors import ConfigError
from edgeft.server.config import load_server_config
from edgeft.server.coordinator import Coordinator


def test_job_with_a_model_source_is_exported_by_the_coordinator(tmp_path, tiny_bert_dir):
    (tmp_path / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    (tmp_path / "jobs.toml").write_text(f"""
[server]
state_dir = "state"
insecure = true

[[job]]
id = "custom"
model = "{tiny_bert_dir}"
rounds = 2
[job.export]
task = "classification"
labels = "labels.json"
max_length = 32
[job.adapter]
rank = 4
target_modules = ["query"]
[job.data]
text_column = "utterance"
label_column = "intent"
""")
    config = load_server_config(tmp_path / "jobs.toml")
    job = config.jobs[0]
    assert job.export.adapter.rank == 4 and job.export.labels == ("a", "b", "c") and job.data.text_column == "utterance"
    coordinator = Coordinator(config)
    manifest = coordinator.bundles["custom"].manifest
    assert manifest.labels == ["a", "b", "c"] and manifest.adapter["target_modules"] == ["query"]
    assert set(coordinator.global_adapter("custom", 0)) == set(manifest.trainable_names)
    again = Coordinator(config)  # a restart reuses the export and the stored state
    assert again.bundles["custom"].digest == coordinator.bundles["custom"].digest
    # other weights in the model folder: the running job refuses them; a job not started yet re-exports
    from safetensors.numpy import load_file, save_file

    from edgeft.errors import BundleError
    from edgeft.export.source import hf_base_digest

    changed = tmp_path / "changed-model"
    shutil.copytree(tiny_bert_dir, changed)
    weights = load_file(changed / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.5
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    text = (tmp_path / "jobs.toml").read_text().replace(str(tiny_bert_dir), str(changed))
    (tmp_path / "jobs.toml").write_text(text)
    with pytest.raises(BundleError, match="a job keeps its base model"):
        Coordinator(load_server_config(tmp_path / "jobs.toml"))
    shutil.copytree(tmp_path / "state" / "exports", tmp_path / "fresh" / "exports")  # an export left by a crash
    (tmp_path / "jobs.toml").write_text(text.replace('state_dir = "state"', 'state_dir = "fresh"'))
    fresh = Coordinator(load_server_config(tmp_path / "jobs.toml"))
    assert fresh.bundles["custom"].manifest.base_model["digest"] == hf_base_digest(changed)
    assert hf_base_digest(changed) != manifest.base_model["digest"]


@pytest.mark.parametrize("body,message", [
    ('[[job]]\nid = "x"\nrounds = 1\n', "exactly one of bundle"),
    ('[[job]]\nid = "x"\nbundle = "b"\nrounds = 0\n', "job.rounds=0"),
    ('[[job]]\nid = "x"\nbundle = "b"\ncolour = "red"\n', "colour"),
    ('[[job]]\nid = "x"\nbundle = "b"\n[job.clients]\nmin = 0\n', "clients.min=0"),
    ("[[job]\n", "not valid TOML"),
    ("[server]\n", "serves TLS only: give \\[server.tls\\] cert and key"),
    ('[server]\ninsecure = "yes"\n', "server.insecure='yes'"),
    ('[server]\ninsecure = true\nlisten = "x"\n', "unknown key.*listen"),
    ('[server]\ninsecure = true\n[server.tls]\ncert = "c"\nkey = "k"\n', "not both"),
    ('[server]\ninsecure = true\n[server.tls]\ncert = "c"\n', "key"),
    ("[server]\ninsecure = true\n[server.limits]\nchunk_bytes = 9000000\n", "limits.chunk_bytes=9000000"),
    ("[server]\ninsecure = true\n[server.limits]\nmax_concurrent_rpcs = 0\n", "limits.max_concurrent_rpcs=0"),
    ("[server]\ninsecure = true\nlease_s = 0.5\n", "server.lease_s=0.5: must be a number of seconds, at least 1"),
    ('[server]\ninsecure = true\nlease_s = "30"\n', "server.lease_s='30'"),
    ("[server]\ninsecure = true\nfinal_answers_s = -1\n", "server.final_answers_s=-1: must be a number of seconds"),
    ('[[job]]\nid = "x"\nbundle = "b"\ndevice_ranks = [4]\n', "device_ranks.*list bundles of the smaller ranks"),
    ('[[job]]\nid = "x"\nmodel = "m"\ndevice_bundles = ["b4"]\n[job.export]\nlabels = ["a", "b"]\n', "device_bundles.*with job.model use device_ranks"),
    ('[[job]]\nid = "x"\nmodel = "m"\ndevice_ranks = [8]\n[job.export]\nlabels = ["a", "b"]\n', "each must be below the job's rank 8"),
    ('[[job]]\nid = "x"\nmodel = "m"\ndevice_ranks = [2, 2]\n[job.export]\nlabels = ["a", "b"]\n', "distinct whole numbers"),
    ('[[job]]\nid = "x"\nmodel = "m"\ndevice_ranks = [4]\nstrategy = "median"\n[job.export]\nlabels = ["a", "b"]\n', "mean of LoRA products"),
    ('[[job]]\nid = "x"\nbundle = "b"\ndevice_bundles = ["b4"]\n[job.clients]\nmin = 2\n[job.secure_aggregation]\n', "secure aggregation hides"),
    # refused when the coordinator starts, not when the first device reads its file
    ('[[job]]\nid = "x"\nbundle = "b"\n[job.data]\nformat = "xml"\n', "job 'x'.*\\[job.data\\] invalid format='xml'.*csv, jsonl, text"),
    ('[[job]]\nid = "x"\nbundle = "b"\nstrategy = "krum"\n[job.clients]\nmin = 4\n', "at least 5 updates"),
])
def test_bad_job_files_name_the_problem(tmp_path, body, message):
    (tmp_path / "jobs.toml").write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_server_config(tmp_path / "jobs.toml")


def test_how_long_a_finished_coordinator_answers_is_a_setting(tmp_path):
    (tmp_path / "jobs.toml").write_text("[server]\ninsecure = true\n")
    assert load_server_config(tmp_path / "jobs.toml").final_answers_s == 10.0
    (tmp_path / "jobs.toml").write_text("[server]\ninsecure = true\nfinal_answers_s = 2\n")
    assert load_server_config(tmp_path / "jobs.toml").final_answers_s == 2


def test_tls_and_limits_are_read_relative_to_the_file(tmp_path):
    (tmp_path / "jobs.toml").write_text("""
[server]
[server.tls]
cert = "certs/server.pem"
key = "certs/server.key"
client_ca = "certs/ca.pem"
[server.limits]
max_concurrent_rpcs = 16
max_message_bytes = 4194304
""")
    config = load_server_config(tmp_path / "jobs.toml")
    assert config.tls.cert == tmp_path / "certs/server.pem" and config.tls.client_ca == tmp_path / "certs/ca.pem"
    assert config.limits.max_concurrent_rpcs == 16 and config.limits.max_message_bytes == 4 << 20
    assert not config.insecure
    with pytest.raises(ConfigError, match="not both"):  # --insecure does not silently drop a configured TLS
        load_server_config(tmp_path / "jobs.toml", insecure=True)
    (tmp_path / "plain.toml").write_text("[server]\n")
    assert load_server_config(tmp_path / "plain.toml", insecure=True).insecure  # what --insecure does
