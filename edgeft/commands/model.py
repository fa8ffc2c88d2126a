"""``edgeft export``, ``edgeft train``, ``edgeft deploy`` and ``edgeft predict``: a model's way from a Hugging
Face folder to a training bundle, a locally trained adapter, a deployment package and its predictions."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from edgeft.commands.common import csv_list, labels
from edgeft.errors import EdgeftError


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a Hugging Face model folder (text or image classification) into a "
                                      "training bundle")
    p.add_argument("model", help="Hugging Face model folder: config.json and weights, with tokenizer.json (text "
                                 "models) or preprocessor_config.json (image-classification models: ResNet, "
                                 "MobileNetV2, EfficientNet, ViT, ConvNeXt, ...; the device preprocesses as it says)")
    p.add_argument("--out", required=True, help="bundle folder to create (must be new or empty)")
    p.add_argument("--task", default="classification", choices=["classification", "causal-lm", "regression", "multilabel"])
    p.add_argument("--labels", help="label names: a JSON list file, a text file (one per line) or a,b,c")
    p.add_argument("--adapter", default="lora", choices=["lora", "head", "full"])
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--target-modules", help="modules LoRA adapts (Linear or Conv2d), comma-separated (default: per "
                                            "architecture: e.g. query,value for BERT and ViT, the last stage's "
                                            "convolutions for ResNet, MobileNet, EfficientNet and ConvNeXt)")
    p.add_argument("--trainable-modules", help="modules trained in full, comma-separated (default: the task head)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--engine", default="portable", choices=["portable", "ort-training"],
                   help="training engine the bundle is for: portable (default: standard ONNX graphs any onnxruntime "
                        ">= 1.19 trains, on any execution provider) or ort-training (onnxruntime-training 1.19.2)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 14 for ort-training, 18 portable)")
    p.add_argument("--max-length", type=int, default=128, help="text models: tokens per example on the device "
                                                                 "(default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--proximal-mu", type=float, default=0.0,
                   help="FedProx: add mu/2 * ||w - w_global||^2 to the training loss (default 0: none)")
    p.add_argument("--pooling", default="auto", choices=["auto", "sentence", "cls"],
                   help="what the task head reads: the model's own sentence pooling (sentence-transformers "
                        "folders), the Hugging Face [CLS] head, or auto (sentence where declared; default)")
    p.add_argument("--loss", choices=["dpo"], help="causal LMs: dpo trains on prompt/chosen/rejected preference rows "
                                                    "instead of next-token loss (default: the task's loss)")
    p.add_argument("--dpo-beta", type=float, default=0.1, help="--loss dpo: beta (default 0.1)")
    p.add_argument("--base-bits", type=int, choices=[8, 4], help="portable engine: store the frozen base's weight "
                                                                 "matrices in 8 or 4 bits, dequantised in the training "
                                                                 "graph (default: fp32)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="causal LMs of the Llama family (Llama, SmolLM2, Qwen2, Phi-3, Mistral), portable engine: train "
                        "layer by layer, keeping each layer's input only and recomputing the rest in the backward pass "
                        "(far less memory on the device, about the same speed)")
    p.add_argument("--keep-projections", action="store_true",
                   help="with --gradient-checkpointing: keep each layer's q/k/v/gate/up outputs for the backward pass "
                        "instead of recomputing them (selective checkpointing: faster, more memory)")
    p.add_argument("--no-augment", action="store_true",
                   help="image models: no training augmentation (random resized crop, flip); head-only bundles then "
                        "train on cached features")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from edgeft.config import AdapterConfig, ExportConfig, OptimizerConfig
    from edgeft.export import export_hf

    config = ExportConfig(
        task=args.task, labels=labels(args.labels),
        adapter=AdapterConfig(kind=args.adapter, rank=args.rank, alpha=args.alpha,
                              target_modules=csv_list(args.target_modules),
                              trainable_modules=csv_list(args.trainable_modules)),
        optimizer=OptimizerConfig(name=args.optimizer, weight_decay=args.weight_decay),
        opset=args.opset, max_length=args.max_length, seed=args.seed, proximal_mu=args.proximal_mu,
        pooling=args.pooling, engine=args.engine, augment=not args.no_augment, loss=args.loss,
        dpo_beta=args.dpo_beta, base_bits=args.base_bits, gradient_checkpointing=args.gradient_checkpointing,
        keep_projections=args.keep_projections)
    bundle = export_hf(args.model, args.out, config)
    m = bundle.manifest
    size = sum(bundle.file(f).stat().st_size for f in m.files) / 2**20
    n_params = sum(math.prod(t.shape) for t in m.trainable)
    reads = ""
    if m.input_kind == "image":
        spec = m.preprocessing or {}
        reads = f" of {spec.get('channels')} {spec.get('size')}x{spec.get('size')} images"
    print(f"bundle {bundle.path} ({m.engine} engine): {m.task}{reads}, {len(m.trainable)} trainable tensors "
          f"({n_params:,} parameters), {size:.1f} MiB")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a bundle on local data with ONNX Runtime (no torch)")
    p.add_argument("bundle", help="bundle folder made by `edgeft export`")
    p.add_argument("--data", required=True, help="training data: .csv, .jsonl or .txt (text); an image folder or a "
                                                 "table of image paths (image bundles); a table of feature columns "
                                                 "or an .npz of arrays (feature and array bundles)")
    p.add_argument("--val", help="validation data file (default: hold out --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share when --val is absent (0 = none)")
    p.add_argument("--test", help="test data file, evaluated once at the end")
    p.add_argument("--format", choices=["csv", "jsonl", "text"], help="data format (default: from the suffix)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--image-column", help="image bundles: the column of a CSV/JSONL holding image paths (relative "
                                          "to the file); without it --data is an image folder, one sub-folder per class")
    p.add_argument("--feature-columns", help="feature bundles: the numeric columns, comma-separated, or 'all' for "
                                             "every column but the label")
    p.add_argument("--label-map", help="JSON file mapping raw label values to the bundle's label names")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--pack", action="store_true", help="causal LM: pack short examples into rows of the bundle's "
                                                       "max length (each still attends only to itself)")
    p.add_argument("--early-stopping-patience", type=int, help="epochs without improvement before stopping")
    p.add_argument("--early-stopping-metric", default="loss", help="validation metric to watch (default loss)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--provider", help="execution provider: cpu, cuda, coreml, qnn, openvino, ... (default cpu); "
                                      "portable bundles train on any provider the runtime offers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for update.safetensors, peft/ and metrics.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from edgeft.train.session import keep_torch_out

    keep_torch_out()  # a device command: never load torch, even where it is installed
    from edgeft.config import TrainConfig
    from edgeft.run import LocalRun, run_local

    label_map = json.loads(Path(args.label_map).read_text()) if args.label_map else None

    train = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                        learning_rate=args.lr, warmup_ratio=args.warmup_ratio, grad_accum_steps=args.grad_accum,
                        early_stopping_patience=args.early_stopping_patience,
                        early_stopping_metric=args.early_stopping_metric, threads=args.threads, seed=args.seed,
                        provider=args.provider, pack=args.pack, progress=not args.no_progress)
    run_local(LocalRun(bundle=Path(args.bundle), train=_data_config(args, args.data, label_map),
                       val=_data_config(args, args.val, label_map), test=_data_config(args, args.test, label_map),
                       val_fraction=args.val_fraction, config=train, out=Path(args.out)))
    return 0


def add_deploy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="merge a trained adapter, export an inference model, quantise and measure it")
    p.add_argument("--model", help="the base Hugging Face model folder the bundle was exported from (bundles exported "
                                   "from a torch module deploy from Python: edgeft.deploy.deploy_module)")
    p.add_argument("--adapter", help="an adapter folder from `edgeft train` (or its update.safetensors)")
    p.add_argument("--bundle", help="the bundle the --adapter was trained from")
    p.add_argument("--state", help="instead of --adapter: a coordinator's state folder (its state_dir)")
    p.add_argument("--database", help="with --state: the coordinator's [server] database URL (e.g. "
                                      "postgresql+psycopg://user@host/db) when it keeps its state in one")
    p.add_argument("--artifacts", help="with --state: the coordinator's [server] artifacts bucket (s3://bucket/prefix) "
                                       "when it keeps them in one; its credentials and region come from "
                                       "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION")
    p.add_argument("--s3-endpoint", help="with --artifacts: the S3 endpoint URL (default: AWS_ENDPOINT_URL_S3 or "
                                         "AWS S3)")
    p.add_argument("--job", help="with --state: the job whose global adapter to deploy")
    p.add_argument("--round", type=int, help="with --state: the round (default: the latest)")
    p.add_argument("--out", required=True, help="deployment package folder to write")
    p.add_argument("--mode", default="int8", choices=["none", "fp16", "int8", "int8-static", "int4"],
                   help="quantisation (default int8: dynamic, matrix products only; int8-static: QDQ calibrated on "
                        "--calibration-data, for NPUs and CNNs; int4: weight-only MatMulNBits, no convolutions)")
    p.add_argument("--eval-data", help="held-out data for the report's accuracy and latency")
    p.add_argument("--calibration-data", help="int8-static: a sample of the task's data to calibrate on "
                                              "(default: --eval-data)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--image-column", help="image bundles: the column of a CSV/JSONL holding image paths (without "
                                          "it the data is an image folder, one sub-folder per class)")
    p.add_argument("--feature-columns", help="feature bundles: the numeric columns, comma-separated, or 'all'")
    p.add_argument("--fixed-shape", metavar="BATCHxSEQUENCE",
                   help="freeze the input shape, e.g. 1x128 for a text model, 1 (the batch) for the others "
                        "(what NPU execution providers want)")
    p.add_argument("--accuracy-budget", type=float, default=1.0,
                   help="accuracy points the quantised model may lose against fp32 (default 1)")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=_run_deploy)


def _fixed_shape(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        dims = tuple(int(v) for v in value.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) not in (1, 2):
        raise EdgeftError(f"invalid --fixed-shape {value!r}: expected BATCHxSEQUENCE (text models, e.g. 1x128) or "
                          "BATCH (the others, e.g. 1)")
    return dims


def _feature_columns(value: str | None) -> tuple[str, ...] | None:
    return tuple(c.strip() for c in value.split(",") if c.strip()) if value else None


def _data_config(args: argparse.Namespace, path: str | None, label_map: dict | None = None):  # noqa: ANN202
    """The DataConfig of a data path given to train or deploy (their shared column flags); None without a path."""
    from edgeft.data import DataConfig

    return DataConfig(path, text_column=args.text_column, label_column=args.label_column,
                      format=getattr(args, "format", None), label_map=label_map, image_column=args.image_column,
                      feature_columns=_feature_columns(args.feature_columns)) if path else None


def _run_deploy(args: argparse.Namespace) -> int:
    from edgeft.deploy import DeployConfig, deploy

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    report = deploy(DeployConfig(model_dir=path(args.model), out=Path(args.out), bundle=path(args.bundle),
                                 adapter=path(args.adapter), state_dir=path(args.state), database=args.database,
                                 artifacts=args.artifacts, s3_endpoint=args.s3_endpoint, job=args.job,
                                 round=args.round, mode=args.mode, eval_data=_data_config(args, args.eval_data),
                                 calibration_data=_data_config(args, args.calibration_data),
                                 fixed_shape=_fixed_shape(args.fixed_shape),
                                 accuracy_budget=args.accuracy_budget, threads=args.threads))
    print((Path(args.out) / "report.md").read_text())
    print(f"package written to {args.out} (size ratio {report['size_ratio']})")
    return 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="run a deployment package on texts, images or arrays (onnxruntime only, no "
                                       "torch)")
    p.add_argument("inputs", nargs="*", help="what to predict: texts (text packages), image files or folders (image "
                                             "packages), data files: .npz, or CSV/JSONL with --feature-columns "
                                             "(feature and array packages). Without --model the first is the package")
    p.add_argument("--model", help="deployment package folder from `edgeft deploy`")
    p.add_argument("--input", help="a CSV/JSONL file of texts instead of arguments (text packages); a further input "
                                   "file or folder (the others)")
    p.add_argument("--output", help="CSV file to write (input columns + label, score); default: print (one JSON line "
                                    "per image or example for packages that do not read text)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--feature-columns", help="feature packages reading a CSV/JSONL: the numeric columns, "
                                             "comma-separated, or 'all' for every column but --label-column")
    p.add_argument("--label-column", default="label", help="the column 'all' leaves out (default label)")
    p.add_argument("--provider", help="execution provider (cpu, cuda, qnn, openvino, coreml); default cpu")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from edgeft.train.session import keep_torch_out

    keep_torch_out()
    import csv
    import json

    from edgeft.data import DataConfig, read_records
    from edgeft.predict import Predictor, predict_files

    inputs = list(args.inputs)
    if not args.model and not inputs:
        raise EdgeftError("give the deployment package: --model PACKAGE, or as the first argument")
    predictor = Predictor(args.model or inputs.pop(0), provider=args.provider)
    print(f"execution provider: {predictor.provider}", file=sys.stderr)
    if predictor.input_kind != "tokens":
        records = list(predict_files(predictor, inputs + ([args.input] if args.input else []),
                                     _feature_columns(args.feature_columns), args.label_column))
        failed = [r for r in records if "error" in r]
        for record in failed:  # images that do not decode: one line each, the others are predicted
            print(f"edgeft predict: skipped: {record['error']}", file=sys.stderr)
        records = [r for r in records if "error" not in r]
        if args.output:
            with open(args.output, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(records[0]) if records else ["file", "label", "score"])
                writer.writeheader()
                writer.writerows({**r, "score": f"{r['score']:.4f}"} for r in records)
            print(f"{len(records)} predictions written to {args.output}")
        else:
            for record in records:
                print(json.dumps({**record, "score": round(record["score"], 4)}))
        return 1 if failed else 0
    if args.input:
        rows = read_records(DataConfig(args.input, text_column=args.text_column))
        if rows and args.text_column not in rows[0]:
            raise EdgeftError(f"{args.input} has no column {args.text_column!r}; pass --text-column")
        texts = [str(r[args.text_column]) for r in rows]
    else:
        if not inputs:
            raise EdgeftError("give texts to classify, or --input FILE")
        rows, texts = [{"text": t} for t in inputs], list(inputs)
    predictions = predictor.predict(texts)
    if args.output:
        with open(args.output, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[*rows[0].keys(), "label", "score"])
            writer.writeheader()
            for row, (label, score) in zip(rows, predictions):
                writer.writerow({**row, "label": label, "score": f"{score:.4f}"})
        print(f"{len(predictions)} predictions written to {args.output}")
    else:
        for text, (label, score) in zip(texts, predictions):
            print(f"{label}\t{score:.3f}\t{text}")
    return 0


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with a causal-LM deployment package (onnxruntime only, no "
                                        "torch)")
    p.add_argument("model", help="deployment package folder from `edgeft deploy` of a causal-LM bundle")
    p.add_argument("prompt", nargs="?", help="the prompt (a chat package: the user's message); default: read stdin")
    p.add_argument("--messages", help="a JSON file holding a conversation ([{'role', 'content'}, ...]) to continue")
    p.add_argument("--no-chat", action="store_true", help="give the prompt to the model as it is, without the chat "
                                                          "template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to this "
                                                             "probability (default 1: all)")
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--provider", help="execution provider (cpu, cuda, qnn, openvino, coreml); default cpu")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from edgeft.train.session import keep_torch_out

    keep_torch_out()
    from edgeft.generate import Generator

    generator = Generator(args.model, threads=args.threads, provider=args.provider)
    if args.messages:
        prompt = json.loads(Path(args.messages).read_text())
    else:
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    result = generator.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, stop=args.stop, seed=args.seed,
                                chat=False if args.no_chat else None)
    print(result.text)
    print(f"{len(result.tokens)} tokens ({result.stopped_by}) after a {result.prompt_tokens}-token prompt: "
          f"{result.tokens_per_s:.1f} tokens/s, first token after {result.prefill_seconds * 1000:.0f} ms "
          f"({'KV cache' if generator.kv_cache else 'no KV cache'})", file=sys.stderr)
    return 0
