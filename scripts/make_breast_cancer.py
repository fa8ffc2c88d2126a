"""Write scikit-learn's Breast Cancer Wisconsin (Diagnostic) data as the tabular data set edgeft ships.

    python scripts/make_breast_cancer.py [--out DIR]

Writes train.csv / test.csv (30 snake_case feature columns plus ``label``: "malignant" or "benign") and
train.npz / test.npz (``features`` float32 [N, 30], ``labels`` int64: 0 malignant, 1 benign, sklearn's ids) into
edgeft/datasets/breast_cancer. The split is a fixed stratified 80/20 one (``train_test_split``, seed 0); CSV
values are written in the shortest form that reads back to sklearn's float64, and the .npz members carry a fixed
timestamp, so a rerun reproduces every file byte for byte. Needs scikit-learn (not an edgeft dependency).
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "edgeft" / "datasets" / "breast_cancer"
SEED, TEST_FRACTION = 0, 0.2
LABEL_COLUMN = "label"


def snake_case(name: str) -> str:
    """sklearn's feature name as a CSV-friendly column name: "mean concave points" -> "mean_concave_points"."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


def write_csv(path: Path, columns: list[str], features: np.ndarray, labels: list[str]) -> None:
    """One row per example: the features as ``repr(float)`` (exact round trip), then the label name."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow([*columns, LABEL_COLUMN])
        for row, label in zip(features, labels):
            writer.writerow([*(repr(float(v)) for v in row), label])


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """What ``numpy.savez`` writes (members stored, not deflated: no zlib version in the bytes), with a fixed member
    timestamp, so reruns give identical bytes."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, buffer.getvalue())


def make(out: Path) -> list[Path]:
    """Split the data set and write the four files into ``out``; returns their paths."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    columns = [snake_case(str(name)) for name in data.feature_names]
    if len(set(columns)) != len(columns):
        raise SystemExit(f"feature names collide once snake_cased: {columns}")
    names = [str(name) for name in data.target_names]
    index = np.arange(len(data.target))
    parts = dict(zip(("train", "test"), train_test_split(index, test_size=TEST_FRACTION, random_state=SEED,
                                                         stratify=data.target)))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, rows in parts.items():
        features, targets = data.data[rows], data.target[rows].astype(np.int64)
        write_csv(out / f"{split}.csv", columns, features, [names[t] for t in targets])
        write_npz(out / f"{split}.npz", {"features": features.astype(np.float32), "labels": targets})
        written += [out / f"{split}.csv", out / f"{split}.npz"]
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    for path in make(args.out):
        print(f"{path}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
