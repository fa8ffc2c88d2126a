"""Array and tabular inputs: the shipped breast-cancer files through both readers, and one clear line per bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeft.datasets
from edgeft.arrays import check_arrays, read_feature_table, read_npz
from edgeft.bundle import TensorSpec
from edgeft.errors import DataError

DATA = Path(edgeft.datasets.__file__).parent / "breast_cancer"
FEATURES = TensorSpec("features", "float32", ["batch", 30])
SPECS = [FEATURES, TensorSpec("labels", "int64", ["batch"])]  # as a manifest lists them: the target is an input
COUNTS = {"train": (170, 285), "test": (42, 72)}  # (malignant, benign), stratified 80/20 of 212 / 357


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("split", ["train", "test"])
def test_breast_cancer_npz(split):
    inputs, labels = read_npz(DATA / f"{split}.npz", SPECS)
    assert list(inputs) == ["features"]
    assert inputs["features"].dtype == np.float32 and inputs["features"].shape == (sum(COUNTS[split]), 30)
    assert labels.dtype == np.int64 and tuple(np.bincount(labels)) == COUNTS[split]  # 0 malignant, 1 benign


@pytest.mark.parametrize("split", ["train", "test"])
def test_breast_cancer_csv_is_the_npz(split):
    features, labels = read_feature_table(DATA / f"{split}.csv", "all", "label")
    assert features.dtype == np.float32 and features.shape == (sum(COUNTS[split]), 30)
    assert (labels.count("malignant"), labels.count("benign")) == COUNTS[split]
    inputs, ids = read_npz(DATA / f"{split}.npz", SPECS)
    np.testing.assert_array_equal(features, inputs["features"])
    assert labels == [("malignant", "benign")[i] for i in ids]


def test_named_columns_keep_the_given_order():
    features, _ = read_feature_table(DATA / "test.csv", ["worst_area", "mean_radius"], "label", fmt="csv")
    everything, _ = read_feature_table(DATA / "test.csv", "all", "label")
    np.testing.assert_array_equal(features, everything[:, [23, 0]])


def test_the_committed_files_are_what_the_script_writes(tmp_path):
    pytest.importorskip("sklearn")
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_breast_cancer.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("train.csv", "test.csv", "train.npz", "test.npz"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


# -- check_arrays and read_npz: bad inputs ------------------------------------------------------------------


def save(path: Path, **arrays) -> Path:  # noqa: ANN003
    np.savez(path, **arrays)
    return path


def good(n: int = 4) -> dict[str, np.ndarray]:
    return {"features": np.zeros((n, 30), np.float32), "labels": np.arange(n) % 2}


def test_missing_input_is_named_with_what_the_file_holds(tmp_path):
    path = save(tmp_path / "d.npz", feats=np.zeros((4, 30), np.float32), labels=np.zeros(4, np.int64))
    with pytest.raises(DataError) as exc:
        read_npz(path, SPECS)
    assert "no array 'features'" in one_line(exc) and "holds: feats, labels" in one_line(exc)


def test_missing_labels_is_named(tmp_path):
    path = save(tmp_path / "d.npz", features=np.zeros((4, 30), np.float32))
    with pytest.raises(DataError, match=r"no 'labels' array \(it holds: features\)"):
        read_npz(path, SPECS)


def test_wrong_dtype_says_both(tmp_path):
    path = save(tmp_path / "d.npz", **{**good(), "features": np.zeros((4, 30), np.int32)})
    with pytest.raises(DataError) as exc:
        read_npz(path, SPECS)
    assert "'features' has dtype int32, the bundle expects float32" in one_line(exc)


def test_float64_is_cast_and_integers_only_widen():
    spec = [TensorSpec("ids", "int64", ["batch", "sequence"])]
    out = check_arrays({"features": np.ones((2, 30)), "ids": np.ones((2, 5), np.int32)}, [FEATURES, *spec])
    assert out["features"].dtype == np.float32 and out["ids"].dtype == np.int64
    with pytest.raises(DataError, match="'ids' has dtype uint64, the bundle expects int64"):
        check_arrays({"ids": np.ones((2, 5), np.uint64)}, spec)
    huge = np.zeros((2, 30))
    huge[1, 3] = 1e300
    with pytest.raises(DataError, match=r"beyond the float32 range at example 1, index \(3,\)"):
        check_arrays({"features": huge}, [FEATURES])


def test_wrong_shape_names_the_axis(tmp_path):
    path = save(tmp_path / "d.npz", **{**good(), "features": np.zeros((4, 29), np.float32)})
    with pytest.raises(DataError) as exc:
        read_npz(path, SPECS)
    assert "'features' has shape [4, 29], the bundle expects [N, 30]" in one_line(exc)
    assert "axis 1 is 29, not 30" in one_line(exc)
    with pytest.raises(DataError, match=r"has shape \[4\], the bundle expects \[N, 30\]"):
        check_arrays({"features": np.zeros(4, np.float32)}, [FEATURES])


def test_symbolic_and_open_dims_are_free():
    specs = [TensorSpec("ids", "int64", ["batch", "sequence"]), TensorSpec("x", "float32", [-1, -1, "..."])]
    out = check_arrays({"ids": np.zeros((3, 7), np.int64), "x": np.zeros((3, 2, 5, 6), np.float32)}, specs)
    assert out["x"].shape == (3, 2, 5, 6)


def test_count_mismatch_between_inputs_and_with_labels(tmp_path):
    specs = [FEATURES, TensorSpec("mask", "int64", ["batch"])]
    with pytest.raises(DataError) as exc:
        check_arrays({"features": np.zeros((4, 30), np.float32), "mask": np.zeros(3, np.int64)}, specs)
    assert "disagree on the number of examples (axis 0): features has 4, mask has 3" in one_line(exc)
    path = save(tmp_path / "d.npz", **{**good(), "labels": np.zeros(5, np.int64)})
    with pytest.raises(DataError) as exc:
        read_npz(path, SPECS)
    assert "'labels' has 5 entries but the inputs have 4 examples" in one_line(exc)


def test_every_problem_gets_its_own_line():
    specs = [FEATURES, TensorSpec("mask", "int64", ["batch"])]
    with pytest.raises(DataError) as exc:
        check_arrays({"features": np.zeros((4, 30), np.int8)}, specs, "d.npz")
    lines = str(exc.value).splitlines()
    assert len(lines) == 2 and "'features' has dtype int8" in lines[0] and "no array 'mask'" in lines[1]


def test_nan_in_an_input_is_located():
    features = np.zeros((4, 30), np.float32)
    features[2, 5] = np.nan
    with pytest.raises(DataError, match=r"'features' has a non-finite value \(NaN or inf\) at example 2, index \(5,\)"):
        check_arrays({"features": features}, [FEATURES])


def test_string_labels_are_returned_raw(tmp_path):
    path = save(tmp_path / "d.npz", features=np.zeros((2, 30), np.float32), labels=np.array(["benign", "malignant"]))
    _, labels = read_npz(path, SPECS)
    assert labels.tolist() == ["benign", "malignant"]


def test_corrupt_npz_is_one_clear_error(tmp_path):
    path = save(tmp_path / "d.npz", **good())
    path.write_bytes(path.read_bytes()[:200])  # a truncated archive
    with pytest.raises(DataError) as exc:
        read_npz(path, SPECS)
    assert f"{path}" in one_line(exc) and "is not a readable .npz file" in one_line(exc)
    text = tmp_path / "notes.npz"
    text.write_text("features,label\n1,2\n")
    with pytest.raises(DataError, match=f"{text} is not a readable .npz file"):
        read_npz(text, SPECS)
    single = tmp_path / "single.npz"
    with open(single, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(DataError, match="single .npy array, not an .npz archive"):
        read_npz(single, SPECS)
    with pytest.raises(DataError, match="does not exist"):
        read_npz(tmp_path / "absent.npz", SPECS)


def test_pickled_object_array_is_refused(tmp_path):
    path = save(tmp_path / "d.npz", features=np.zeros((2, 30), np.float32),
                labels=np.array(["benign", {"x": 1}], dtype=object))
    with pytest.raises(DataError) as exc:
        read_npz(path, SPECS)
    assert "'labels' holds Python objects" in one_line(exc) and "pickle" in one_line(exc)


# -- read_feature_table: bad inputs ------------------------------------------------------------------------


def table(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_missing_feature_column_lists_the_columns(tmp_path):
    path = table(tmp_path, "a,b,label\n1,2,x\n")
    with pytest.raises(DataError) as exc:
        read_feature_table(path, ["a", "c"], "label")
    assert "has no column 'c' (columns: a, b, label)" in one_line(exc)
    with pytest.raises(DataError, match="has no column 'target'"):
        read_feature_table(path, "all", "target")


def test_non_numeric_value_names_row_column_and_value(tmp_path):
    path = table(tmp_path, "a,b,label\n1,2,x\n3,abc,y\n")
    with pytest.raises(DataError) as exc:
        read_feature_table(path, "all", "label")
    assert "row 2, column 'b': 'abc' is not a number" in one_line(exc)
    path = table(tmp_path, "a,b,label\n1,,x\n")
    with pytest.raises(DataError, match="row 1, column 'b': '' is not a number"):
        read_feature_table(path, "all", "label")


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity"])
def test_nan_and_inf_name_row_and_column(tmp_path, value):
    path = table(tmp_path, f"a,b,label\n1,2,x\n3,{value},y\n")
    with pytest.raises(DataError) as exc:
        read_feature_table(path, "all", "label")
    assert f"row 2, column 'b': '{value}' is not finite" in one_line(exc)


def test_empty_file(tmp_path):
    for text in ("", "a,b,label\n"):
        with pytest.raises(DataError) as exc:
            read_feature_table(table(tmp_path, text), "all", "label")
        assert "has no rows" in one_line(exc)


def test_jsonl_numbers_and_mistakes(tmp_path):
    rows = [{"a": 1, "b": 2.5, "label": "x"}, {"a": "3", "b": 4, "label": "y"}]
    path = table(tmp_path, "\n".join(json.dumps(r) for r in rows) + "\n", "t.jsonl")
    features, labels = read_feature_table(path, "all", "label")
    np.testing.assert_array_equal(features, np.array([[1, 2.5], [3, 4]], np.float32))
    assert labels == ["x", "y"]
    path = table(tmp_path, '{"a": 1, "label": "x"}\n{"a": true, "label": "y"}\n', "t.jsonl")
    with pytest.raises(DataError, match="row 2, column 'a': True is not a number"):
        read_feature_table(path, ["a"], "label")
    path = table(tmp_path, '{"a": 1, "label": "x"}\n{"label": "y"}\n', "t.jsonl")
    with pytest.raises(DataError, match=r"row 2: no column 'a' \(columns: label\)"):
        read_feature_table(path, ["a"], "label")


def test_text_format_and_bad_feature_spec_are_refused(tmp_path):
    with pytest.raises(DataError, match="read from csv or jsonl, not text"):
        read_feature_table(table(tmp_path, "1 2 3", "t.txt"), "all", "label")
    with pytest.raises(DataError, match="give a list of column names or 'all'"):
        read_feature_table(table(tmp_path, "a,label\n1,x\n"), "a", "label")
    with pytest.raises(DataError, match="more fields than the header"):
        read_feature_table(table(tmp_path, "a,label\n1,x,extra\n"), "all", "label")
