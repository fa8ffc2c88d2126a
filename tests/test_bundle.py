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


def _rewrite_manifest(folder, **files):
    """Pin ``files`` (name -> None to drop) in the manifest of ``folder`` with their current sha256."""
    from edgeft.bundle import sha256_of

    manifest = json.loads((folder / "manifest.json").read_text())
    for name, keep in files.items():
        if keep is None:
            manifest["files"].pop(name, None)
        else:
            manifest["files"][name] = sha256_of(folder / name)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return load_bundle(folder)


def _external(folder):
    """Move forward_model.onnx's large initializers to external data in weights.bin."""
    import onnx

    model = onnx.load(str(folder / "forward_model.onnx"))
    onnx.save_model(model, str(folder / "forward_model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=1024)


def _point(folder, location):
    """Make forward_model.onnx's external tensors name ``location`` as their data file."""
    import onnx

    model = onnx.load(str(folder / "forward_model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(folder / "forward_model.onnx"))


def test_onnx_files_pass_the_checker_and_keep_their_external_data_inside_the_bundle(bundle_copy, tmp_path):
    from edgeft.bundle import check_bundle

    check_bundle(load_bundle(bundle_copy))  # ORT's training graphs (LayerNormalization at opset 14) pass
    _external(bundle_copy)
    check_bundle(_rewrite_manifest(bundle_copy, **{"forward_model.onnx": True, "weights.bin": True}))
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    for location, message in (("../secret.bin", "outside the bundle"),
                              (str(tmp_path / "secret.bin"), "outside the bundle"), ("other.bin", "does not list")):
        _point(bundle_copy, location)
        with pytest.raises(BundleError, match=message):
            check_bundle(_rewrite_manifest(bundle_copy, **{"forward_model.onnx": True}))


def test_a_graph_onnx_refuses_is_named(bundle_copy):
    import onnx

    from edgeft.bundle import check_bundle

    model = onnx.load(str(bundle_copy / "eval_model.onnx"))
    model.graph.node[0].op_type = "Frobnicate"  # no such operator in the ONNX domain
    onnx.save_model(model, str(bundle_copy / "eval_model.onnx"))
    with pytest.raises(BundleError, match="eval_model.onnx fails onnx.checker: .*Frobnicate"):
        check_bundle(_rewrite_manifest(bundle_copy, **{"eval_model.onnx": True}))
    (bundle_copy / "eval_model.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(BundleError, match="eval_model.onnx"):
        check_bundle(_rewrite_manifest(bundle_copy, **{"eval_model.onnx": True}))


def test_file_names_and_symbolic_links_that_reach_outside_are_refused(bundle_copy, tmp_path):
    for name in ("../state.db", "/etc/passwd", "a/../../b", "C:evil", "sub\\..\\x"):
        manifest = json.loads((bundle_copy / "manifest.json").read_text())
        manifest["files"][name] = "0" * 64
        (tmp_path / "m.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match="reaches outside the bundle folder"):
            load_bundle(_with_manifest(bundle_copy, tmp_path / "m.json", tmp_path / "b2"))
    outside = tmp_path / "outside.json"
    shutil.copyfile(bundle_copy / "tokenizer.json", outside)
    (bundle_copy / "tokenizer.json").unlink()
    (bundle_copy / "tokenizer.json").symlink_to(outside)  # same bytes, same sha256: still refused
    with pytest.raises(BundleError, match="tokenizer.json .* is a symbolic link"):
        load_bundle(bundle_copy)


def _with_manifest(bundle_dir, manifest_file, target):
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(bundle_dir, target)
    shutil.copyfile(manifest_file, target / "manifest.json")
    return target
