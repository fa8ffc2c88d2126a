"""Training data for models that do not read text: images, numeric feature columns, arrays by input name.

The bundle's manifest says which (``input_kind``); ``load_inputs`` reads a data path into a dataset that
``edgeft.data.batches`` batches like a text one (same ``lengths`` / ``collate`` interface), so ``edgeft train``,
the agent, the statistics round and the evaluation all use these readers. Device side: numpy and Pillow only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.bundle import Bundle, TensorSpec
from edgeft.records import DataConfig, targets_of
from edgeft.errors import DataError


def model_inputs(bundle: Bundle) -> list[TensorSpec]:
    """The bundle's model inputs, labels excluded."""
    return [spec for spec in bundle.manifest.inputs if spec.name != "labels"]


@dataclass
class ArrayDataset:
    """Fixed-shape examples: ``inputs[name][i]`` is example i's value of model input ``name``."""

    inputs: dict[str, np.ndarray]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: np.ndarray | list[int]) -> "ArrayDataset":
        index = np.asarray(index, dtype=np.int64)
        return ArrayDataset({k: v[index] for k, v in self.inputs.items()}, self.targets[index])

    @property
    def lengths(self) -> np.ndarray:
        return np.ones(len(self), dtype=np.int64)

    def collate(self, index: np.ndarray, pad_id: int = 0, train: bool = False,
                rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        return {**{k: v[index] for k, v in self.inputs.items()}, "labels": self.targets[index]}


@dataclass
class ImageDataset:
    """Image files, decoded and preprocessed per batch (``edgeft.images``): training batches get the bundle's
    seeded augmentation, every other batch the deterministic resize and centre crop."""

    paths: list[Path]
    targets: np.ndarray
    preprocessing: object  # edgeft.images.ImagePreprocessing
    input_name: str

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: np.ndarray | list[int]) -> "ImageDataset":
        return ImageDataset([self.paths[i] for i in index], self.targets[np.asarray(index, dtype=np.int64)],
                            self.preprocessing, self.input_name)

    @property
    def lengths(self) -> np.ndarray:
        return np.ones(len(self), dtype=np.int64)

    def collate(self, index: np.ndarray, pad_id: int = 0, train: bool = False,
                rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        from edgeft.images import preprocess_batch

        pixels = preprocess_batch([self.paths[i] for i in index], self.preprocessing, train=train, rng=rng)
        return {self.input_name: pixels, "labels": self.targets[index]}


def load_inputs(config: DataConfig, bundle: Bundle) -> ArrayDataset | ImageDataset:
    """Read ``config.path`` for the bundle's input kind: an image folder or a table of image paths
    (``image_column``), a table of numeric ``feature_columns``, or an ``.npz`` of arrays by model input name."""
    manifest, specs = bundle.manifest, model_inputs(bundle)
    kind = manifest.input_kind
    if not config.path.exists():
        raise DataError(f"data path {config.path} does not exist")
    if kind == "image":
        from edgeft.images import ImagePreprocessing, read_image_folder, read_image_table

        if config.path.is_dir():
            pairs = read_image_folder(config.path)
        elif config.image_column:
            pairs = read_image_table(config.path, config.image_column, config.label_column, config.format)
        else:
            raise DataError(f"{config.path} is a file: an image bundle reads an image folder (one sub-folder per "
                            "class) or a CSV/JSONL table of image paths named with --image-column")
        paths, raw = [p for p, _ in pairs], [label for _, label in pairs]
        spec = ImagePreprocessing.from_dict(manifest.preprocessing or {})
        return ImageDataset(paths, _classes(raw, bundle, config), spec, specs[0].name)
    if kind == "features":
        from edgeft.arrays import read_feature_table

        if config.path.suffix.lower() == ".npz":
            return _npz(config, bundle, specs)
        columns = list(config.feature_columns or ())
        if not columns:
            raise DataError(f"{config.path}: a feature bundle reads numeric columns: name them with "
                            "--feature-columns (comma-separated, or 'all' for every column but the label)")
        features, raw = read_feature_table(config.path, columns if columns != ["all"] else "all",
                                           config.label_column, config.format)
        width = specs[0].shape[-1]
        if isinstance(width, int) and width > 0 and features.shape[1] != width:
            raise DataError(f"{config.path}: {features.shape[1]} feature columns, but the bundle's model reads "
                            f"{width} features ({specs[0].name} {specs[0].shape})")
        return ArrayDataset({specs[0].name: features.astype(specs[0].dtype, copy=False)},
                            _classes(raw, bundle, config))
    if kind == "arrays":
        return _npz(config, bundle, specs)
    raise DataError(f"edgeft cannot read data for a bundle whose input kind is {kind!r}")


def _npz(config: DataConfig, bundle: Bundle, specs: list[TensorSpec]) -> ArrayDataset:
    from edgeft.arrays import read_npz

    inputs, raw = read_npz(config.path, specs)
    return ArrayDataset(inputs, _classes(raw, bundle, config))


def _classes(raw: object, bundle: Bundle, config: DataConfig) -> np.ndarray:
    """Targets from raw labels: label names (mapped by the bundle's labels), or class ids already."""
    values = np.asarray(raw)
    labels = bundle.manifest.labels
    if bundle.manifest.task == "classification" and np.issubdtype(values.dtype, np.integer):
        bad = values[(values < 0) | (values >= len(labels))]
        if bad.size:
            raise DataError(f"{config.path}: class id {int(bad[0])} is outside the bundle's {len(labels)} labels "
                            f"(0..{len(labels) - 1})")
        return values.astype(np.int64)
    return targets_of([str(v) for v in values.tolist()], bundle.manifest, config)
