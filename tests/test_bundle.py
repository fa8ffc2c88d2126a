"""Bundles are verified before use: a corrupt or missing file is named, never trained on."""

from __future__ import annotations

import json
import shutil

import pytest

from edgeft.bundle import load_bundle
from edgeft.errors import BundleError


@pytest.fixture()
def bundle_copy(tmp_path, tiny_bundle):
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, target)
    return target


def test_sha256_mismatch_is_named(bundle_copy):
    with open(bundle_copy / "eval_model.onnx", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match=r"eval_model.onnx is corrupt: sha256"):
        load_bundle(bundle_copy)


def test_missing_file_is_named(bundle_copy):
    (bundle_copy / "checkpoint").unlink()
    with pytest.raises(BundleError, match="checkpoint is missing"):
        load_bundle(bundle_copy)


def test_missing_or_bad_manifest(bundle_copy, tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path / "empty")
    (bundle_copy / "manifest.json").write_text("{ truncated")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)


def test_newer_format_version_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(bundle_copy)


def test_digest_identifies_the_bundle(tiny_bundle, bundle_copy):
    assert load_bundle(bundle_copy).digest == tiny_bundle.digest
