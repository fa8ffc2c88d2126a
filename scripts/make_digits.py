"""Write scikit-learn's digits (UCI Optical Recognition of Handwritten Digits, test part) as PNG image folders.

    .venv/bin/python scripts/make_digits.py

Writes ``edgeft/datasets/digits/{train,test}/<label>/<index>.png``: 1,797 grey 8x8 images, 10 classes, in
torchvision's ImageFolder layout (``edgeft.images.read_image_folder`` reads it). ``<index>`` is the sample's row
in ``sklearn.datasets.load_digits()``, zero-padded to 4 digits so that file order is index order. The split is
scikit-learn's ``train_test_split(test_size=0.2, stratify=labels, random_state=0)``: 80/20 within every class.
Pixels 0..16 (the count of ink pixels in a 4x4 block) become ``round(v * 255 / 16)`` as uint8, Pillow mode
"L". Deterministic: running it again writes the same bytes. Needs scikit-learn (not an edgeft dependency).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "edgeft" / "datasets" / "digits"
SEED, TEST_FRACTION = 0, 0.2


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The fixed stratified 80/20 split: {"train": sorted indices, "test": sorted indices}."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels,
                                   random_state=SEED)
    return {"train": np.sort(train), "test": np.sort(test)}


def to_pixels(image: np.ndarray) -> np.ndarray:
    """An 8x8 image of 0..16 counts as uint8 grey levels 0..255."""
    return np.rint(np.asarray(image, dtype=np.float64) * 255.0 / 16.0).astype(np.uint8)


def write(out: Path) -> dict[str, int]:
    """Write both splits under ``out`` (replacing the old ``train``/``test`` folders); the count of each split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = {}
    for split, indices in split_indices(digits.target).items():
        folder = out / split
        if folder.exists():
            shutil.rmtree(folder)
        for index in indices:
            target = folder / str(int(digits.target[index])) / f"{index:04d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_pixels(digits.images[index])).save(target, optimize=True)
        counts[split] = len(indices)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    counts = write(parser.parse_args().out)
    print(", ".join(f"{split}: {n} images" for split, n in counts.items()))


if __name__ == "__main__":
    main()
