"""Where training examples come from, before any model reads them: the data schema (a job's ``[job.data]``,
a task's data, ``edgeft train``'s flags), a data file's records (CSV, JSONL, plain text) and their labels as the
bundle's targets. ``edgeft.data`` (text), ``edgeft.inputs`` (images, tables, arrays) and ``edgeft.arrays`` read
through it; it imports none of them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.bundle import Manifest
from edgeft.errors import DataError, check_config

FORMATS = ("csv", "jsonl", "text")


@dataclass(frozen=True)
class DataSchema:
    """Which columns of a data file hold the text and the label, and the file's format: ``csv``, ``jsonl`` or
    ``text`` (one document; for causal LM); ``None`` (or "") guesses from the suffix. The one schema type: a job's
    ``[job.data]``, the task a device gets, and ``edgeft train``'s flags all make one."""

    text_column: str = "text"
    label_column: str = "label"
    format: str | None = None
    image_column: str | None = None  # image bundles, a table of image paths (None: the path is an image folder)
    feature_columns: tuple[str, ...] | None = None  # feature bundles: the numeric columns ("all": all but the label)

    def __post_init__(self) -> None:
        if isinstance(self.feature_columns, (str, list)):
            object.__setattr__(self, "feature_columns", (self.feature_columns,) if isinstance(
                self.feature_columns, str) else tuple(self.feature_columns))
        if not self.format:
            object.__setattr__(self, "format", None)
        check_config(self.format is None or self.format in FORMATS, "format", self.format,
                     f"expected one of {', '.join(FORMATS)} (or leave it out: from the file's suffix)")


@dataclass(frozen=True)
class DataConfig:
    """Where the examples are and which columns hold what (the fields of a ``DataSchema``).

    label_map: optional mapping from raw label values in the file to the bundle's label names.
    label_separator: separates labels in a multi-label cell (JSON lists work too).
    """

    path: Path
    text_column: str = "text"
    label_column: str = "label"
    format: str | None = None
    label_map: dict[str, str] | None = None
    label_separator: str = ";"
    image_column: str | None = None
    feature_columns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        schema = self.schema  # validates
        object.__setattr__(self, "format", schema.format)
        object.__setattr__(self, "feature_columns", schema.feature_columns)

    @classmethod
    def of(cls, path: str | Path, schema: DataSchema, **options) -> "DataConfig":  # noqa: ANN003
        """A data file read with ``schema`` (options: label_map, label_separator)."""
        return cls(Path(path), schema.text_column, schema.label_column, schema.format, image_column=schema.image_column,
                   feature_columns=schema.feature_columns, **options)

    @property
    def schema(self) -> DataSchema:
        return DataSchema(self.text_column, self.label_column, self.format, self.image_column, self.feature_columns)

    @property
    def resolved_format(self) -> str:
        if self.format:
            return self.format
        suffix = self.path.suffix.lower()
        return {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "text"}.get(suffix, "text")


def read_records(config: DataConfig) -> list[dict]:
    """Rows of a CSV or JSONL file as dicts (``text`` format: one record holding the whole file)."""
    path = config.path
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    fmt = config.resolved_format
    try:
        if fmt == "text":
            return [{config.text_column: path.read_text(encoding="utf-8")}]
        if fmt == "csv":
            with open(path, newline="", encoding="utf-8") as fh:
                return list(csv.DictReader(fh))
        rows = []
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
                    rows.append(row)
        return rows
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); is it the right file?") from exc
    except (json.JSONDecodeError, csv.Error) as exc:
        raise DataError(f"{path} is not valid {fmt}: {exc}") from exc


def _column(rows: list[dict], name: str, config: DataConfig) -> list:
    if not rows:
        raise DataError(f"{config.path} has no rows")
    missing = [i for i, row in enumerate(rows) if name not in row]
    if missing:
        columns = ", ".join(map(str, rows[missing[0]].keys()))
        raise DataError(f"{config.path} has no column {name!r} (row {missing[0] + 1}; columns: {columns}); "
                        f"pick the column with --text-column / --label-column")
    return [row[name] for row in rows]


def targets_of(raw: list, manifest: Manifest, config: DataConfig) -> np.ndarray:
    labels = manifest.labels
    if manifest.task == "regression":
        try:
            values = np.asarray([float(v) for v in raw], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{config.path}: column {config.label_column!r} must hold numbers ({exc})") from exc
        return values.reshape(-1, 1)
    index = {name: i for i, name in enumerate(labels)}
    mapped = (lambda v: config.label_map.get(str(v), str(v))) if config.label_map else (lambda v: str(v))
    if manifest.task == "classification":
        unknown = sorted({mapped(v) for v in raw} - set(index))
        if unknown:
            raise DataError(f"{config.path}: unknown label(s) {unknown[:5]} in column {config.label_column!r}; "
                            f"the bundle knows {len(labels)} labels ({', '.join(labels[:8])}...); "
                            "fix the data or pass a label map")
        return np.asarray([index[mapped(v)] for v in raw], dtype=np.int64)
    targets = np.zeros((len(raw), len(labels)), dtype=np.float32)
    for row, value in enumerate(raw):
        items = value if isinstance(value, list) else (
            json.loads(value) if str(value).startswith("[") else [v for v in str(value).split(config.label_separator) if v])
        for item in items:
            name = mapped(item).strip()
            if name not in index:
                raise DataError(f"{config.path} row {row + 1}: unknown label {name!r}; known: {', '.join(labels[:8])}...")
            targets[row, index[name]] = 1.0
    return targets
