"""Array and tabular inputs for on-device training: ``.npz`` files of model inputs and numeric CSV/JSONL tables.

numpy only (devices never import torch or pandas). Whatever the file, the arrays are checked against the bundle's
input specs (``check_arrays``) before anything trains or predicts on them, so a bad file fails at once with a
``DataError`` that names the file, the input and the problem.

dtype policy: an array's dtype must equal its spec's, with two exceptions that cannot change a value the model
sees: float64 where the spec says float32 is cast (numpy's default float; a value too large for float32 is then
refused as non-finite), and an integer array where the spec names a wider integer type that holds every value
of it (int32 token ids for an int64 input). Every other difference (float to int, int to float, narrowing) is
refused rather than cast silently.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeft.bundle import TensorSpec
from edgeft.records import DataConfig, read_records
from edgeft.errors import DataError

LABELS = "labels"  # the .npz array holding the raw labels (and the training graph's target input)
ALL_FEATURES = "all"  # read_feature_table's "every column but the label"
ANY_AXES = "..."  # a spec dimension standing for any number of trailing axes
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_arrays(inputs: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], source: str = "inputs"
                 ) -> dict[str, np.ndarray]:
    """The arrays that ``specs`` name, checked and ready to feed: every named array present, of the spec's dtype
    (see the module's dtype policy), its shape the spec's with the first axis the example axis (any length) and
    symbolic or negative dims free, float values finite, and all of them holding the same number of examples.
    Arrays the specs do not name are left out. ``source`` (a file name) starts every message; one ``DataError``
    lists every problem, one line each."""
    problems: list[str] = []
    checked: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in inputs:
            held = ", ".join(sorted(inputs)) or "nothing"
            problems.append(f"{source}: no array {spec.name!r} for the model input of that name (it holds: {held})")
            continue
        array, problem = _conform(np.asarray(inputs[spec.name]), spec)
        if problem:
            problems.append(f"{source}: input {spec.name!r} {problem}")
        else:
            checked[spec.name] = array
    counts = {name: len(array) for name, array in checked.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name} has {count}" for name, count in counts.items())
        problems.append(f"{source}: the inputs disagree on the number of examples (axis 0): {listed}")
    if problems:
        raise DataError("\n".join(problems))
    return checked


def example_count(arrays: Mapping[str, np.ndarray]) -> int:
    """The number of examples in checked arrays (0 when there are none)."""
    return len(next(iter(arrays.values()))) if arrays else 0


def read_npz(path: str | Path, specs: Sequence[TensorSpec]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The model inputs and the raw labels of an ``.npz`` file: one array per input name, examples first, plus
    ``labels`` (class ids as integers, label strings, or float targets for regression). Inputs are checked with
    ``check_arrays``; a spec named ``labels`` (the training graph's target) is not checked against the file's
    ``labels``, which stay raw for the caller to map to class ids. Loads without pickle: object arrays are
    refused."""
    path = Path(path)
    arrays = _load_npz(path)
    if LABELS not in arrays:
        raise DataError(f"{path} has no {LABELS!r} array (it holds: {', '.join(sorted(arrays)) or 'nothing'}); "
                        f"save the labels with the inputs: numpy.savez(path, ..., {LABELS}=labels)")
    labels = _check_labels(arrays[LABELS], str(path))
    inputs = check_arrays(arrays, [spec for spec in specs if spec.name != LABELS], str(path))
    if inputs and len(labels) != example_count(inputs):
        raise DataError(f"{path}: {LABELS!r} has {len(labels)} entries but the inputs have "
                        f"{example_count(inputs)} examples; there must be one label per example")
    return inputs, labels


def read_feature_table(path: str | Path, feature_columns: Sequence[str] | str, label_column: str,
                       fmt: str | None = None, labelled: bool = True) -> tuple[np.ndarray, list | None]:
    """The named numeric columns of a CSV or JSONL file as float32 [N, F], in the order given, and the raw labels.

    ``feature_columns="all"`` means every column but ``label_column``, in the file's order (the CSV header, or the
    keys of the first JSON object). ``fmt`` is "csv" or "jsonl"; ``None`` guesses from the suffix. Rows are
    counted from 1, the CSV header not counted. Every value must be a finite number that fits float32 (numbers
    in JSON, or text that parses as one); an empty file, a missing column or a bad value raises ``DataError``.
    ``labelled=False`` (prediction): the label column may be absent (the labels returned are then None)."""
    config = DataConfig(Path(path), label_column=label_column, format=fmt)
    if config.resolved_format not in ("csv", "jsonl"):
        raise DataError(f"{config.path}: a feature table is read from csv or jsonl, not "
                        f"{config.resolved_format}; name the format (fmt='csv' or 'jsonl') or use a .csv/.jsonl name")
    rows = read_records(config)
    if not rows:
        raise DataError(f"{config.path} has no rows; a feature table needs a header and at least one example")
    columns = _feature_names(rows[0], feature_columns, label_column, config.path)
    has_labels = labelled or label_column in rows[0]
    _check_columns(rows, [*columns, label_column] if has_labels else columns, config.path)
    features = np.empty((len(rows), len(columns)), dtype=np.float32)
    for i, row in enumerate(rows):
        features[i] = [_number(row[name], config.path, i + 1, name) for name in columns]
    return features, [row[label_column] for row in rows] if has_labels else None


def _conform(array: np.ndarray, spec: TensorSpec) -> tuple[np.ndarray, str]:
    """``array`` cast per the dtype policy, or a problem ("has dtype ...") saying what is wrong with it."""
    try:
        want = np.dtype(spec.dtype)
    except TypeError:
        return array, f"has a dtype {spec.dtype!r} in the bundle that numpy does not know; re-export the bundle"
    if array.dtype != want and not _castable(array.dtype, want):
        return array, (f"has dtype {array.dtype}, the bundle expects {want}; convert it before saving "
                       f"(array.astype('{want}')) if that keeps its meaning")
    shape_problem = _shape_problem(array.shape, spec.shape)
    if shape_problem:
        return array, shape_problem
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return array, f"has a non-finite value (NaN or inf) at {_first_bad(array)}"
    if array.dtype != want:
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
            array = array.astype(want)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            return array, f"has a value beyond the float32 range at {_first_bad(array)}"
    return array, ""


def _first_bad(array: np.ndarray) -> str:
    """Where the first non-finite value of a float array is: "example 3" or "example 3, index (0, 7)"."""
    where = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
    return f"example {where[0]}" + (f", index {where[1:]}" if len(where) > 1 else "")


def _castable(have: np.dtype, want: np.dtype) -> bool:
    """Whether the dtype policy allows casting ``have`` to ``want``: float64 -> float32, or int -> wider int."""
    if have == np.float64 and want == np.float32:
        return True
    return have.kind in "iu" and want.kind in "iu" and np.can_cast(have, want, casting="safe")


def _shape_problem(shape: tuple[int, ...], dims: Sequence[int | str]) -> str:
    """Why ``shape`` does not fit a spec's dims (axis 0 = examples; str or negative dims free), or ""."""
    expected = "[" + ", ".join(["N", *(str(d) for d in dims[1:])]) + "] (N examples first)"
    trailing = list(dims[1:])
    open_ended = bool(trailing) and trailing[-1] == ANY_AXES
    fixed = trailing[:-1] if open_ended else trailing
    if not dims or len(shape) < 1 + len(fixed) or (not open_ended and len(shape) != len(dims)):
        return f"has shape {list(shape)}, the bundle expects {expected}"
    for axis, (have, want) in enumerate(zip(shape[1:], fixed), 1):
        if isinstance(want, int) and want >= 0 and have != want:
            return f"has shape {list(shape)}, the bundle expects {expected}: axis {axis} is {have}, not {want}"
    return ""


def _check_labels(labels: np.ndarray, source: str) -> np.ndarray:
    """The raw labels when they are one per example: integers, strings, or finite floats."""
    if labels.ndim < 1:
        raise DataError(f"{source}: {LABELS!r} is a scalar; it needs one label per example (axis 0)")
    if labels.dtype.kind not in "iuUf":
        raise DataError(f"{source}: {LABELS!r} has dtype {labels.dtype}; labels are class ids (integers), label "
                        "strings or float targets")
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise DataError(f"{source}: {LABELS!r} has a non-finite value (NaN or inf) at {_first_bad(labels)}")
    return labels


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, loaded without pickle; anything else is one ``DataError`` naming it."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    hint = "write it with numpy.savez(path, <input name>=array, ..., labels=labels)"
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz file ({_reason(exc)}); {hint}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an .npz archive of named arrays; {hint}")
    arrays: dict[str, np.ndarray] = {}
    with loaded:
        for name in loaded.files:
            try:
                arrays[name] = loaded[name]
            except ValueError as exc:
                if "pickle" in str(exc):
                    raise DataError(f"{path}: array {name!r} holds Python objects (dtype object), which only "
                                    "pickle can load; refused: save numbers or fixed-width strings "
                                    "(numpy.asarray(values, dtype=str))") from exc
                raise DataError(f"{path}: array {name!r} is unreadable ({_reason(exc)}); {hint}") from exc
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise DataError(f"{path}: array {name!r} is unreadable ({_reason(exc)}); {hint}") from exc
    return arrays


def _reason(exc: BaseException) -> str:
    """An exception as one short line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _feature_names(first: Mapping, feature_columns: Sequence[str] | str, label_column: str, path: Path) -> list[str]:
    """The feature column names: the given list, or every column but the label for ``"all"``."""
    if isinstance(feature_columns, str):
        if feature_columns != ALL_FEATURES:
            raise DataError(f"feature columns {feature_columns!r}: give a list of column names or "
                            f"{ALL_FEATURES!r} (every column but the label)")
        columns = [str(name) for name in first if name is not None and name != label_column]
    else:
        columns = list(feature_columns)
    if not columns:
        raise DataError(f"{path}: no feature columns to read (columns: {', '.join(map(str, first))}; "
                        f"label column {label_column!r})")
    if label_column in columns:
        raise DataError(f"{path}: {label_column!r} is both the label column and a feature column")
    return columns


def _check_columns(rows: Sequence[Mapping], names: Sequence[str], path: Path) -> None:
    """Every row has every named column (and, in a CSV, no more fields than the header names)."""
    for number, row in enumerate(rows, 1):
        if None in row:
            raise DataError(f"{path} row {number}: more fields than the header has columns")
        missing = [name for name in names if name not in row]
        if missing:
            where = f"{path} has no column" if number == 1 else f"{path} row {number}: no column"
            raise DataError(f"{where} {missing[0]!r} (columns: {', '.join(map(str, row))})")


def _number(value: object, path: Path, row: int, column: str) -> float:
    """A table cell as a finite float that fits float32, or a ``DataError`` naming its row and column."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{path} row {row}, column {column!r}: {value!r} is not a number")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise DataError(f"{path} row {row}, column {column!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise DataError(f"{path} row {row}, column {column!r}: {value!r} is not finite (NaN or inf); "
                        "fill or drop the row")
    if abs(number) > FLOAT32_MAX:
        raise DataError(f"{path} row {row}, column {column!r}: {value!r} does not fit float32")
    return number
