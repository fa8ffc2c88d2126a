"""edgeft.images: preprocessing equals torchvision's transforms on the same Pillow images, augmentation is
seeded, Hugging Face preprocessor configs map to specs, the readers refuse bad data with one clear line, and
the shipped digits folder is complete."""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeft.errors import ConfigError, DataError
from edgeft.images import (ImagePreprocessing, center_crop_box, load_image, preprocess, preprocess_batch,
                           random_crop_box, read_image_folder, read_image_table, resized_size)

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "edgeft" / "datasets" / "digits"
DIGITS_SHA256 = "030feb570818e4599a7ace78a81d6d9009220395c90f0db206d0b566fe4dfae9"  # digits/SOURCE.md
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tv() -> types.SimpleNamespace:
    """torchvision's transforms (edgeft.testing.torchvision_reference: the pinned wheel in a folder of its own)."""
    pytest.importorskip("torch")
    from edgeft.testing.torchvision_reference import ReferenceUnavailable, transforms

    try:
        return transforms()
    except ReferenceUnavailable as exc:
        pytest.skip(str(exc))


def _image(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    """A smooth gradient plus noise: exercises the filters the way photos do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 100 * np.sin(x / 7.0)[..., None] * np.cos(y / 5.0)[..., None]
    pixels = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _reference(tv: types.SimpleNamespace, image: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    T = tv.T
    mode = {"nearest": T.InterpolationMode.NEAREST, "bilinear": T.InterpolationMode.BILINEAR,
            "bicubic": T.InterpolationMode.BICUBIC}[spec.interpolation]
    resize = T.Resize((spec.size, spec.size) if spec.resize == 0 else spec.resize, interpolation=mode)
    pipeline = T.Compose([resize, T.CenterCrop(spec.size), T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    return pipeline(image).numpy()


def _digit_png() -> Path:
    return DIGITS / "train" / "3" / sorted(p.name for p in (DIGITS / "train" / "3").iterdir())[0]


PARITY_CASES = [  # (width, height, mode, spec overrides)
    (300, 200, "RGB", {}),
    (200, 300, "RGB", {}),
    (256, 256, "RGB", {}),
    (640, 97, "RGB", {}),
    (64, 48, "RGB", {}),  # upscaled
    (333, 257, "L", {"channels": "L", "mean": (0.5,), "std": (0.25,)}),
    (301, 199, "RGB", {"interpolation": "bicubic"}),
    (301, 199, "RGB", {"interpolation": "nearest"}),
    (250, 180, "RGB", {"resize": 0}),
    (260, 230, "RGB", {"size": 96, "resize": 112}),
]


@pytest.mark.parametrize("width,height,mode,overrides", PARITY_CASES)
def test_eval_equals_torchvision(tv, width, height, mode, overrides):
    spec = ImagePreprocessing(**overrides)
    image = _image(width, height, mode)
    ours, theirs = preprocess(image, spec), _reference(tv, image, spec)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == spec.shape
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_digit_png_upscaled_equals_torchvision(tv):
    spec = ImagePreprocessing(channels="L", mean=(0.5,), std=(0.5,))
    image = load_image(_digit_png(), spec)
    assert image.mode == "L" and image.size == (8, 8)
    ours, theirs = preprocess(image, spec), _reference(tv, image, spec)
    assert ours.shape == (1, 224, 224) and np.abs(ours - theirs).max() <= TOLERANCE


def test_bgr_is_rgb_reversed():
    image = _image(120, 90, "RGB")
    rgb = preprocess(image, ImagePreprocessing(size=64, resize=72, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)))
    bgr = preprocess(image, ImagePreprocessing(size=64, resize=72, mean=(0.3, 0.2, 0.1), std=(0.6, 0.5, 0.4),
                                               channels="BGR"))
    np.testing.assert_allclose(bgr, rgb[::-1], atol=1e-6)


def test_training_crop_equals_torchvision_resized_crop_and_flip(tv):
    """Given the same crop box, the training transform is torchvision's resized_crop (+ hflip when drawn)."""
    spec = ImagePreprocessing(size=64)
    image = _image(150, 110, "RGB")
    for seed in range(6):
        left, top, right, bottom = random_crop_box(*image.size, np.random.default_rng(seed))
        flip = np.random.default_rng(seed)
        random_crop_box(*image.size, flip)
        crop = tv.F.resized_crop(image, top, left, bottom - top, right - left, [64, 64],
                                 interpolation=tv.T.InterpolationMode.BILINEAR)
        crop = tv.F.hflip(crop) if flip.random() < 0.5 else crop
        theirs = tv.F.normalize(tv.F.to_tensor(crop), spec.mean, spec.std).numpy()
        ours = preprocess(image, spec, train=True, rng=np.random.default_rng(seed))
        assert np.abs(ours - theirs).max() <= TOLERANCE


def test_random_crop_boxes_follow_randomresizedcrop():
    rng = np.random.default_rng(0)
    for width, height in [(100, 80), (37, 300), (300, 37), (1000, 3), (1, 1)]:
        for _ in range(200):
            left, top, right, bottom = random_crop_box(width, height, rng)
            w, h = right - left, bottom - top
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            if (width, height) == (100, 80):  # never the fallback here: scale and ratio hold (rounding aside)
                assert 0.08 * 8000 * 0.9 <= w * h <= 8000
                assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # too thin for any 8 %, 3/4..4/3 crop: every try fails, then the centre, clamped to the ratio range
    assert random_crop_box(1000, 3, np.random.default_rng(0)) == (498, 0, 502, 3)
    assert random_crop_box(3, 1000, np.random.default_rng(0)) == (0, 498, 3, 502)


def test_augmentation_is_seeded():
    spec = ImagePreprocessing(size=32, resize=36)
    images = [_image(80, 60, "RGB", seed=i) for i in range(4)]
    first = preprocess_batch(images, spec, train=True, rng=np.random.default_rng(7))
    again = preprocess_batch(images, spec, train=True, rng=np.random.default_rng(7))
    other = preprocess_batch(images, spec, train=True, rng=np.random.default_rng(8))
    assert first.shape == (4, 3, 32, 32) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert not np.allclose(first, preprocess_batch(images, spec))


def test_augment_off_equals_eval():
    spec = ImagePreprocessing(size=32, resize=40, augment=False)
    images = [_image(90, 70, "RGB", seed=i) for i in range(3)]
    np.testing.assert_array_equal(preprocess_batch(images, spec, train=True, rng=np.random.default_rng(0)),
                                  preprocess_batch(images, spec))


def test_batch_reads_paths_and_training_needs_rng(tmp_path):
    file = tmp_path / "a.jpg"
    _image(50, 40, "RGB").save(file)
    spec = ImagePreprocessing(size=16, resize=20)
    np.testing.assert_array_equal(preprocess_batch([file], spec)[0], preprocess(load_image(file), spec))
    assert preprocess_batch([], spec).shape == (0, 3, 16, 16)
    with pytest.raises(ConfigError, match="rng"):
        preprocess(load_image(file), spec, train=True)


def test_geometry_helpers_match_torchvision_rules():
    assert resized_size(300, 200, 256) == (384, 256)
    assert resized_size(200, 300, 256) == (256, 384)
    assert resized_size(640, 97, 256) == (1689, 256)  # int(256 * 640 / 97) truncates
    assert center_crop_box(257, 256, 224) == (16, 16, 240, 240)  # round(16.5) = 16: Python rounds half to even


def test_spec_round_trips_through_json_and_validates():
    spec = ImagePreprocessing(size=8, resize=0, channels="L", mean=(0.5,), std=(0.5,), augment=False)
    again = ImagePreprocessing.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.shape == (1, 8, 8)
    for bad, field in [({"channels": "CMYK"}, "channels"), ({"interpolation": "lanczos"}, "interpolation"),
                       ({"size": 0}, "size"), ({"resize": 100}, "resize"), ({"std": (0.2, 0.0, 0.2)}, "std"),
                       ({"channels": "L"}, "mean"), ({"mean": (0.1, 0.2)}, "mean"), ({"rescale": 0}, "rescale"),
                       ({"augment": "yes"}, "augment")]:
        with pytest.raises(ConfigError, match=f"invalid {field}="):
            ImagePreprocessing(**bad)
    with pytest.raises(ConfigError, match="unknown keys"):
        ImagePreprocessing.from_dict({"size": 8, "crop": 3})


HF_CONFIGS = [
    ("vit", {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
             "resample": 2, "do_rescale": True, "rescale_factor": 0.00392156862745098, "do_normalize": True,
             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
     dict(size=224, resize=0, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", keep_aspect=False)),
    ("resnet-50 (ConvNext processor)", {"image_processor_type": "ConvNextImageProcessor", "crop_pct": 0.875,
                                        "do_normalize": True, "do_resize": True, "resample": 3,
                                        "size": {"shortest_edge": 224}, "image_mean": [0.485, 0.456, 0.406],
                                        "image_std": [0.229, 0.224, 0.225]},
     dict(size=224, resize=256, interpolation="bicubic")),
    ("convnext-384", {"image_processor_type": "ConvNextImageProcessor", "crop_pct": 0.875, "resample": 3,
                      "size": {"shortest_edge": 384}},
     dict(size=384, resize=0, interpolation="bicubic")),
    ("clip", {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_resize": True, "resample": 3,
              "size": {"shortest_edge": 224}, "image_mean": [0.48145466, 0.4578275, 0.40821073],
              "image_std": [0.26862954, 0.26130258, 0.27577711]},
     dict(size=224, resize=224, mean=(0.48145466, 0.4578275, 0.40821073),
          std=(0.26862954, 0.26130258, 0.27577711), interpolation="bicubic")),
    ("deit", {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "resample": 3,
              "size": {"height": 256, "width": 256}},
     dict(size=224, resize=256, interpolation="bicubic", keep_aspect=False)),
    ("legacy feature extractor", {"feature_extractor_type": "ViTFeatureExtractor", "size": 384, "resample": 2,
                                  "do_normalize": False, "do_rescale": False},
     dict(size=384, resize=0, mean=(0.0,), std=(1.0,), rescale=1.0, keep_aspect=False)),
    ("poolformer", {"crop_pct": 0.9, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
                    "size": {"shortest_edge": 224}, "resample": 3},
     dict(size=224, resize=248, interpolation="bicubic")),
]


@pytest.mark.parametrize("name,config,expected", HF_CONFIGS, ids=[c[0] for c in HF_CONFIGS])
def test_from_hf(tmp_path, name, config, expected):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    spec = ImagePreprocessing.from_hf(tmp_path)  # the model folder; the file itself works too
    assert spec == ImagePreprocessing(**expected)
    assert ImagePreprocessing.from_hf(tmp_path / "preprocessor_config.json") == spec


def test_from_hf_refuses_what_it_cannot_honour(tmp_path):
    with pytest.raises(ConfigError, match="invalid resample=1"):
        ImagePreprocessing.from_hf_dict({"resample": 1})
    with pytest.raises(ConfigError, match="square"):
        ImagePreprocessing.from_hf_dict({"size": {"height": 224, "width": 160}})
    with pytest.raises(ConfigError, match="preprocessor config"):
        ImagePreprocessing.from_hf(tmp_path)


def test_load_image_names_an_undecodable_file(tmp_path):
    good = tmp_path / "good.png"
    _image(40, 30, "RGB").save(good)
    garbage, truncated = tmp_path / "garbage.jpg", tmp_path / "truncated.png"
    garbage.write_bytes(b"this is not an image")
    truncated.write_bytes(good.read_bytes()[:80])
    for bad in (garbage, truncated):
        with pytest.raises(DataError) as caught:
            load_image(bad)
        message = str(caught.value)
        assert str(bad) in message and "not a readable image" in message and "\n" not in message
    with pytest.raises(DataError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    assert load_image(good).mode == "RGB" and load_image(good, ImagePreprocessing(channels="L",
                                                                                  mean=(0.5,), std=(0.5,))).mode == "L"


def test_read_image_folder(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
    _image(10, 10, "RGB").save(tmp_path / "dog" / "b.PNG")
    _image(10, 10, "RGB").save(tmp_path / "dog" / "a.jpg")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / ".hidden.png").write_bytes(b"")
    (tmp_path / ".cache").mkdir()
    with pytest.raises(DataError, match=r"class folder .*cat holds no image files"):
        read_image_folder(tmp_path)
    _image(10, 10, "RGB").save(tmp_path / "cat" / "c.webp")
    assert read_image_folder(tmp_path) == [(tmp_path / "cat" / "c.webp", "cat"), (tmp_path / "dog" / "a.jpg", "dog"),
                                           (tmp_path / "dog" / "b.PNG", "dog")]
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        read_image_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        read_image_folder(tmp_path / "empty")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_read_image_table(tmp_path, fmt):
    (tmp_path / "img").mkdir()
    _image(10, 10, "RGB").save(tmp_path / "img" / "a.png")
    absolute = tmp_path / "b.png"
    _image(10, 10, "RGB").save(absolute)
    rows = [{"file": "img/a.png", "y": "cat"}, {"file": str(absolute), "y": 3}]

    def table(rows: list[dict], name: str = "t") -> Path:
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "csv":
            path.write_text("file,y\n" + "".join(f"{r['file']},{r['y']}\n" for r in rows))
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    path = table(rows)
    assert read_image_table(path, "file", "y") == [(tmp_path / "img" / "a.png", "cat"), (absolute, "3")]
    with pytest.raises(DataError, match=r"no column 'path' \(row 1; columns: file, y\)"):
        read_image_table(path, "path", "y")
    with pytest.raises(DataError, match="no column 'label'"):
        read_image_table(path, "file", "label")
    missing = table([rows[0], {"file": "img/nope.png", "y": "dog"}], "missing")
    with pytest.raises(DataError, match=r"row 2: image .*nope.png does not exist"):
        read_image_table(missing, "file", "y")
    with pytest.raises(DataError, match="does not exist"):
        read_image_table(tmp_path / f"absent.{fmt}", "file", "y")


def test_digits_folder_is_complete():
    splits = {split: read_image_folder(DIGITS / split) for split in ("train", "test")}
    assert {label for _, label in splits["train"]} == {str(d) for d in range(10)}
    assert {label for _, label in splits["test"]} == {str(d) for d in range(10)}
    assert (len(splits["train"]), len(splits["test"])) == (1437, 360)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(DIGITS.rglob("*.png")))).hexdigest()
    assert digest == DIGITS_SHA256
    image = load_image(splits["test"][0][0], ImagePreprocessing(channels="L", mean=(0.5,), std=(0.5,)))
    assert image.size == (8, 8) and image.mode == "L"


def test_digits_pixels_are_scikit_learns():
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    digits = load_digits()
    for path in sorted(DIGITS.rglob("*.png"))[::97]:
        index = int(path.stem)
        assert path.parent.name == str(digits.target[index])
        expected = np.rint(digits.images[index] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)
