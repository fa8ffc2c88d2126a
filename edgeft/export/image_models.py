"""What a Hugging Face image-classification folder holds: how to tell one from a text folder, its preprocessing
for the manifest, and the exact rewrites its model gets before export so that both engines train it (global
average pools, explicit "same" padding)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from edgeft.errors import ConfigError, ExportError
from edgeft.images import ImagePreprocessing

IMAGE_PREPROCESSOR = "preprocessor_config.json"
PREPROCESSOR_EXAMPLE = ('{"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 2, '
                        '"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}')


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{path} is not a JSON object")
    return data


def is_image_folder(model_dir: str | Path) -> bool:
    """A Hugging Face image-classification folder: config.json's ``architectures`` end in
    ``ForImageClassification``, or the folder holds an image ``preprocessor_config.json`` and no tokenizer."""
    model_dir = Path(model_dir)
    architectures = _read_json(model_dir / "config.json").get("architectures") or []
    if any(str(a).endswith("ForImageClassification") for a in architectures):
        return True
    preprocessor = model_dir / IMAGE_PREPROCESSOR
    if not preprocessor.is_file() or (model_dir / "tokenizer.json").is_file():
        return False
    settings = _read_json(preprocessor)
    return "image_mean" in settings or str(settings.get("image_processor_type", "")).endswith("ImageProcessor")


def image_preprocessing(model_dir: Path, channels: int) -> dict:
    """The ImagePreprocessing (as a dict) of a Hugging Face image folder's preprocessor_config.json, for a model
    reading ``channels`` channels (1: grey, 3: RGB)."""
    file = model_dir / IMAGE_PREPROCESSOR
    if not file.is_file():
        raise ExportError(
            f"model folder {model_dir} has no {IMAGE_PREPROCESSOR}: the device resizes, crops and normalises its "
            f"images as that file says. Save the model's image processor there "
            f"(AutoImageProcessor.from_pretrained(<checkpoint>).save_pretrained('{model_dir}')) or write one with the "
            f"values the model was trained with, e.g. {PREPROCESSOR_EXAMPLE}")
    try:
        spec = ImagePreprocessing.from_hf(file)
        if channels == 1:
            spec = replace(spec, channels="L")
    except ConfigError as exc:
        raise ExportError(f"{file}: {exc}") from exc
    if spec.n_channels != channels:
        raise ExportError(f"{model_dir}: the model reads {channels}-channel images (config.json num_channels); "
                          f"edgeft's image inputs have 1 (grey) or 3 (RGB) channels")
    return spec.to_dict()


def global_average_pools(model: nn.Module, example_inputs: dict[str, torch.Tensor]) -> int:
    """Run ``model`` on the example and replace each AvgPool2d whose window covers its whole input (EfficientNet's
    pooler: a kernel as wide as the channel count, ceil_mode) by AdaptiveAvgPool2d(1): the same mean, exported as
    GlobalAveragePool, whose gradient both engines compute (AveragePool's has no ONNX translation for the portable
    engine and stops onnxruntime-training 1.19.2 with a floating-point exception). Returns how many."""
    seen: dict[str, tuple] = {}
    pools = {name: m for name, m in model.named_modules() if type(m) is nn.AvgPool2d}
    hooks = [m.register_forward_hook(lambda _m, args, out, name=name: seen.__setitem__(
        name, (tuple(args[0].shape[-2:]), tuple(out.shape[-2:])))) for name, m in pools.items()]
    try:
        with torch.no_grad():
            model(**example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    count = 0
    for name, ((height, width), out) in seen.items():
        pool = pools[name]
        kernel, padding = nn.modules.utils._pair(pool.kernel_size), nn.modules.utils._pair(pool.padding)
        if out == (1, 1) and kernel[0] >= height and kernel[1] >= width and padding == (0, 0) \
                and pool.divisor_override is None:
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, nn.AdaptiveAvgPool2d(1))
            count += 1
    return count


def explicit_same_padding(model: nn.Module) -> int:
    """Give each Conv2d with ``padding="same"`` its padding as numbers where they are symmetric (stride 1, an even
    ``dilation * (kernel - 1)``): the same convolution, exported with ``pads`` instead of ``auto_pad=SAME_UPPER``,
    whose gradient (ConvGrad) never returns in onnxruntime-training 1.19.2 (EfficientNet). Returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.padding == "same":
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if all(t % 2 == 0 for t in total):
                module.padding = tuple(t // 2 for t in total)
                count += 1
    return count
