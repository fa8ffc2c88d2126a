"""Job files: a bundle or a model to export, validation that names the bad field."""

from __future__ import annotations

import json

import pytest

from edgeft.errors import ConfigError
from edgeft.server.config import load_server_config
from edgeft.server.coordinator import Coordinator


def test_job_with_a_model_source_is_exported_by_the_coordinator(tmp_path, tiny_bert_dir):
    (tmp_path / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    (tmp_path / "jobs.toml").write_text(f"""
[server]
state_dir = "state"

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


@pytest.mark.parametrize("body,message", [
    ('[[job]]\nid = "x"\nrounds = 1\n', "exactly one of bundle"),
    ('[[job]]\nid = "x"\nbundle = "b"\nrounds = 0\n', "job.rounds=0"),
    ('[[job]]\nid = "x"\nbundle = "b"\ncolour = "red"\n', "colour"),
    ('[[job]]\nid = "x"\nbundle = "b"\n[job.clients]\nmin = 0\n', "clients.min=0"),
    ("[[job]\n", "not valid TOML"),
])
def test_bad_job_files_name_the_problem(tmp_path, body, message):
    (tmp_path / "jobs.toml").write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_server_config(tmp_path / "jobs.toml")
