"""Image inputs for on-device training: decode with Pillow, resize, crop, augment and normalise with numpy.

Device side: no torch, no torchvision. The evaluation transform is torchvision's ``Resize(resize) +
CenterCrop(size) + ToTensor() + Normalize(mean, std)`` on Pillow images, and training augmentation is its
``RandomResizedCrop(size) + RandomHorizontalFlip()``, drawn from a numpy Generator, so a model pretrained with
the usual torchvision recipe sees the same pixels on the device (tests/test_images.py checks it against
torchvision). The ``ImagePreprocessing`` a bundle was exported with is recorded in its manifest as a dict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgeft.errors import ConfigError, DataError, check_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# the spec's channels -> (the Pillow mode images are decoded into, channels of the model input)
CHANNELS = {"RGB": ("RGB", 3), "BGR": ("RGB", 3), "L": ("L", 1)}
INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC}
HF_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values in preprocessor configs
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's defaults


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a device turns an image file into the model's ``[C, size, size]`` float32 input.

    size: the side of the square the model reads (the centre crop). resize: the shorter side before the crop
    (0: resize straight to size x size); with ``keep_aspect=False`` the image is squashed to resize x resize
    instead (Hugging Face configs whose ``size`` is a height and a width). mean, std: per output channel, in the
    output order (one value stands for every channel). channels: "RGB", "BGR" or "L" (grey, 1 channel).
    interpolation: Pillow's filter for every resize. rescale: multiplies the 0..255 pixels before normalising.
    augment: training batches get a random resized crop and a horizontal flip (False: as evaluation).
    """

    size: int = 224
    resize: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: str = "RGB"
    interpolation: str = "bilinear"
    rescale: float = 1 / 255
    augment: bool = True
    keep_aspect: bool = True

    def __post_init__(self) -> None:
        for name in ("mean", "std"):  # JSON gives lists; a single number stands for every channel
            value = getattr(self, name)
            value = (value,) if isinstance(value, (int, float)) else value
            check_config(isinstance(value, (list, tuple)) and all(_is_number(v) for v in value), name, value,
                         "expected a list of numbers, one per channel")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        check_config(self.channels in CHANNELS, "channels", self.channels, f"expected one of {', '.join(CHANNELS)}")
        check_config(self.interpolation in INTERPOLATIONS, "interpolation", self.interpolation,
                     f"expected one of {', '.join(INTERPOLATIONS)}")
        check_config(_is_int(self.size) and self.size >= 1, "size", self.size, "expected a positive whole number")
        check_config(_is_int(self.resize) and (self.resize == 0 or self.resize >= self.size), "resize", self.resize,
                     f"expected 0 (straight to size x size) or a side of at least size={self.size}")
        n, want = self.n_channels, "1 value" if self.n_channels == 1 else f"1 or {self.n_channels} values"
        for name in ("mean", "std"):
            check_config(len(getattr(self, name)) in (1, n), name, getattr(self, name),
                         f"channels={self.channels!r} has {n} channel(s): give {want}")
        check_config(all(math.isfinite(v) for v in self.mean), "mean", self.mean, "expected finite values")
        check_config(all(math.isfinite(v) and v > 0 for v in self.std), "std", self.std, "expected positive values")
        check_config(_is_number(self.rescale) and math.isfinite(self.rescale) and self.rescale > 0, "rescale",
                     self.rescale, "expected a positive number (1/255 maps 0..255 to 0..1)")
        check_config(isinstance(self.augment, bool), "augment", self.augment, "expected true or false")
        check_config(isinstance(self.keep_aspect, bool), "keep_aspect", self.keep_aspect, "expected true or false")

    @property
    def n_channels(self) -> int:
        return CHANNELS[self.channels][1]

    @property
    def shape(self) -> tuple[int, int, int]:
        """One preprocessed image's shape, ``(C, size, size)``."""
        return (self.n_channels, self.size, self.size)

    def to_dict(self) -> dict:
        """JSON-ready fields (for a bundle's manifest)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> ImagePreprocessing:
        """The spec ``to_dict`` wrote; an unknown key is refused (a newer edgeft's field must not be ignored)."""
        known = sorted(f.name for f in fields(cls))
        check_config(set(data) <= set(known), "preprocessing", sorted(set(data) - set(known)),
                     f"unknown keys; known: {', '.join(known)}")
        return cls(**dict(data))

    @classmethod
    def from_hf(cls, path: str | Path) -> ImagePreprocessing:
        """The spec of a Hugging Face ``preprocessor_config.json`` (the file, or the model folder holding it)."""
        path = Path(path)
        file = path / "preprocessor_config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no Hugging Face image preprocessor config at {file}")
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as exc:  # not JSON, or not UTF-8
            raise ConfigError(f"{file} is not valid JSON: {exc}") from exc
        check_config(isinstance(config, dict), str(file), type(config).__name__, "expected a JSON object")
        return cls.from_hf_dict(config)

    @classmethod
    def from_hf_dict(cls, config: Mapping) -> ImagePreprocessing:
        """Map a preprocessor config's keys (ViT, DeiT, ConvNeXt/ResNet, CLIP, PoolFormer styles) to a spec.

        size {"height", "width"} (or an int with no crop_size): squash to that square, then crop_size if
        do_center_crop. size {"shortest_edge"} (or an int with a crop_size): shorter side, then the crop (crop_size,
        else a square of shortest_edge). crop_pct (ConvNeXt, ResNet): shorter side int(shortest_edge / crop_pct)
        and a crop of shortest_edge below 384, a squash to shortest_edge x shortest_edge from 384 up; with a
        crop_size (PoolFormer): shorter side int(shortest_edge / crop_pct), then the crop. do_resize false: resized
        to the crop (or size) square anyway, since the model reads a fixed shape (a no-op for images already that
        size). do_rescale false: rescale 1; do_normalize false: mean 0, std 1. Ignored: longest_edge, do_pad,
        size_divisor, do_convert_rgb (always RGB), label options. Absent keys take this class's defaults (saved
        configs list every key). Centre crops use torchvision's rounding; Hugging Face floors the offset, so with
        an odd margin the crop sits one pixel over.
        """
        resample = config.get("resample", 2)
        check_config(resample in HF_RESAMPLE, "resample", resample, "edgeft supports 0 (nearest), 2 (bilinear) and "
                     "3 (bicubic)")
        size_cfg, crop_cfg = config.get("size", 224), config.get("crop_size")
        crop = _hf_square(crop_cfg, "crop_size") if config.get("do_center_crop", True) and crop_cfg else None
        shortest = (isinstance(size_cfg, Mapping) and "shortest_edge" in size_cfg) or (
            _is_int(size_cfg) and crop_cfg is not None)
        side = _hf_square(size_cfg, "size")
        crop_pct, keep_aspect = config.get("crop_pct"), True
        if not config.get("do_resize", True):
            size, resize = crop or side, 0
        elif crop_pct and shortest:
            check_config(_is_number(crop_pct) and 0 < crop_pct <= 1, "crop_pct", crop_pct, "expected 0 < crop_pct <= 1")
            size, resize = crop or side, int(side / crop_pct) if crop or side < 384 else 0
        elif shortest:
            size, resize = crop or side, side
        else:
            size, resize, keep_aspect = crop or side, side if crop else 0, False
        scale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
        normalize = config.get("do_normalize", True)
        mean = config.get("image_mean", IMAGENET_MEAN) if normalize else (0.0,)
        std = config.get("image_std", IMAGENET_STD) if normalize else (1.0,)
        return cls(size=size, resize=resize, mean=mean, std=std, interpolation=HF_RESAMPLE[resample],
                   rescale=scale, keep_aspect=keep_aspect)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


def _hf_square(value: object, name: str) -> int:
    """The side of an int or {"height", "width"} (or {"shortest_edge"}) size; edgeft's inputs are square."""
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        check_config(value.get("height") == value.get("width") and _is_int(value.get("height")), name, dict(value),
                     "edgeft needs a square input: height == width")
        return int(value["height"])
    check_config(_is_int(value), name, value, "expected an int or {height, width}")
    return int(value)  # type: ignore[arg-type]


def load_image(path: str | Path, spec: ImagePreprocessing | None = None) -> Image.Image:
    """The image at ``path``, fully decoded in the spec's mode (RGB by default); ``DataError`` when it cannot be."""
    path, mode = Path(path), CHANNELS[(spec or ImagePreprocessing()).channels][0]
    if not path.is_file():
        raise DataError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated or corrupt file fails here, not in the middle of a batch
            return image.convert(mode) if image.mode != mode else image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{path} is not a readable image ({reason})") from exc


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``shorter`` (torchvision's Resize(int): the longer side truncated)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """Pillow's (left, top, right, bottom) of the centred size x size square (torchvision CenterCrop's rounding)."""
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def random_crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop: torchvision RandomResizedCrop.get_params's algorithm (area
    scale 0.08..1, log-uniform aspect ratio 3/4..4/3, 10 tries, then the whole image clamped to the ratios)."""
    area, log_ratio = height * width, (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    ratio = width / height  # every try failed: the centre, clamped to the ratio range
    if ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def _resize(image: Image.Image, width: int, height: int, spec: ImagePreprocessing) -> Image.Image:
    """Pillow's resize (its own antialiasing, as torchvision on Pillow images); none when the size is right."""
    return image if image.size == (width, height) else image.resize((width, height), INTERPOLATIONS[spec.interpolation])


def eval_image(image: Image.Image, spec: ImagePreprocessing) -> Image.Image:
    """The deterministic transform: resize (shorter side, or a square), then the centre crop."""
    if spec.resize == 0:
        return _resize(image, spec.size, spec.size, spec)
    width, height = resized_size(*image.size, spec.resize) if spec.keep_aspect else (spec.resize, spec.resize)
    image = _resize(image, width, height, spec)
    return image.crop(center_crop_box(width, height, spec.size))


def train_image(image: Image.Image, spec: ImagePreprocessing, rng: np.random.Generator) -> Image.Image:
    """The training transform: a random resized crop to size x size, mirrored with probability 0.5."""
    image = _resize(image.crop(random_crop_box(*image.size, rng)), spec.size, spec.size, spec)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def to_array(image: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """A [C, H, W] float32 array: pixels * rescale, channels reordered (BGR), normalised per channel."""
    pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    # divide by 1/rescale: exactly ToTensor's x / 255 for the default rescale of 1/255
    array = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(1.0 / spec.rescale)
    if spec.channels == "BGR":
        array = array[::-1]
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((array - mean) / std, dtype=np.float32)


def preprocess(image: Image.Image, spec: ImagePreprocessing, *, train: bool = False,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """One image as the model's float32 [C, size, size] input; ``train`` augments it with ``rng`` (when the
    spec's ``augment`` is on), so the same seed gives the same batches."""
    mode = CHANNELS[spec.channels][0]
    image = image if image.mode == mode else image.convert(mode)
    if train and spec.augment:
        if rng is None:
            raise ConfigError("training augmentation needs rng (a numpy Generator), so that runs are reproducible")
        return to_array(train_image(image, spec, rng), spec)
    return to_array(eval_image(image, spec), spec)


def preprocess_batch(images: Sequence[Image.Image | str | Path], spec: ImagePreprocessing, *, train: bool = False,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """A [N, C, size, size] float32 batch of images (Pillow images, or paths read with ``load_image``)."""
    arrays = [preprocess(image if isinstance(image, Image.Image) else load_image(image, spec), spec, train=train,
                         rng=rng) for image in images]
    return np.stack(arrays) if arrays else np.zeros((0, *spec.shape), dtype=np.float32)


def is_image_file(path: Path) -> bool:
    """An image by its suffix (case-insensitive), not a hidden file."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_image_folder(root: str | Path) -> list[tuple[Path, str]]:
    """(image path, class name) for torchvision's ImageFolder layout: ``root/<class>/**/<image>``, classes and
    files sorted; hidden files and folders skipped, as are files without an image suffix."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    examples: list[tuple[Path, str]] = []
    for name in classes:
        folder = root / name
        files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p)
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not files:
            raise DataError(f"class folder {folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        examples.extend((file, name) for file in files)
    return examples


def read_image_table(path: str | Path, image_column: str, label_column: str,
                     fmt: str | None = None) -> list[tuple[Path, str]]:
    """(image path, label) per row of a CSV or JSONL table (``fmt``, else from the suffix); relative image paths
    are relative to the table's folder. Every image must exist."""
    path = Path(path)
    rows = _read_rows(path, fmt)
    if not rows:
        raise DataError(f"{path} has no rows")
    examples: list[tuple[Path, str]] = []
    for number, row in enumerate(rows, 1):
        for column in (image_column, label_column):
            if column not in row:
                raise DataError(f"{path} has no column {column!r} (row {number}; columns: {', '.join(map(str, row))})")
        image, label = str(row[image_column] or "").strip(), row[label_column]
        for column, value in ((image_column, image), (label_column, label)):
            if value is None or str(value) == "":
                raise DataError(f"{path} row {number}: the {column!r} cell is empty")
        file = Path(image)
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise DataError(f"{path} row {number}: image {file} does not exist")
        examples.append((file, str(label)))
    return examples


def _read_rows(path: Path, fmt: str | None) -> list[Mapping]:
    """The table's rows as mappings (CSV with a header, or one JSON object a line): ``edgeft.records.read_records``."""
    from edgeft.records import DataConfig, read_records

    config = DataConfig(path, format=fmt)
    check_config(config.resolved_format in ("csv", "jsonl"), "format", config.resolved_format,
                 f"{path}: an image table is csv or jsonl")
    if not path.is_file():
        raise DataError(f"image table {path} does not exist")
    return read_records(config)
