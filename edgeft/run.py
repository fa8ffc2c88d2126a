"""One local fine-tuning job, from files to files: what ``edgeft train`` does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgeft.bundle import load_bundle
from edgeft.config import TrainConfig
from edgeft.data import DataConfig, Encoder, load_dataset, split
from edgeft.train.engines import open_session, runtime_version
from edgeft.train.trainer import TrainResult, evaluate, pad_id_of, train
from edgeft.update import PEFT_DIR, UPDATE_FILE, AdapterUpdate, save_peft_adapter, save_update


@dataclass(frozen=True)
class LocalRun:
    """Train ``bundle`` on ``train`` (validating on ``val`` or a held-out share), test on ``test``."""

    bundle: Path
    train: DataConfig
    out: Path
    val: DataConfig | None = None
    test: DataConfig | None = None
    val_fraction: float = 0.1
    config: TrainConfig = TrainConfig()


def run_local(job: LocalRun) -> tuple[TrainResult, dict]:
    """Run the job; write ``update.safetensors``, ``peft/`` (LoRA bundles) and ``metrics.json`` to ``job.out``.

    Returns the training result and the summary written to ``metrics.json``.
    """
    bundle = load_bundle(job.bundle)
    encoder = Encoder(bundle) if bundle.manifest.input_kind == "tokens" else None  # tokenise once for all files
    train_data = load_dataset(job.train, bundle, encoder)
    val_data = load_dataset(job.val, bundle, encoder) if job.val else None
    if val_data is None and job.val_fraction > 0:
        train_data, val_data = split(train_data, job.val_fraction, job.config.seed)

    from edgeft.chat import truncation_note  # jinja2 only loads when training runs

    for name, dataset in (("training", train_data), ("validation", val_data)):
        note = truncation_note(getattr(dataset, "notes", {}))
        if note:
            print(f"{name} data: {note}", flush=True)

    def report(record: dict) -> None:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
        print(json.dumps(shown), flush=True)

    session = open_session(bundle, threads=job.config.threads, provider=job.config.provider)
    print(f"training on the {session.engine} engine, execution provider {session.provider} "
          f"(onnxruntime {runtime_version()})", flush=True)
    result = train(bundle, train_data, job.config, val_data, session=session, on_epoch=report)
    summary = {"history": result.history, "best_epoch": result.best_epoch, "steps": result.steps,
               "n_examples": result.n_examples, "stopped_early": result.stopped_early}
    if getattr(train_data, "notes", None):
        summary["data"] = train_data.notes
    if job.test:
        session = open_session(bundle, threads=job.config.threads, provider=job.config.provider)
        session.set_parameters(result.parameters)
        test = evaluate(session, load_dataset(job.test, bundle, encoder), bundle.manifest.task, pad_id_of(bundle),
                        bundle=bundle)
        summary["test"] = test
        print(json.dumps({"test": {k: round(v, 4) for k, v in test.items()}}), flush=True)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    save_update(out / UPDATE_FILE, AdapterUpdate(result.parameters, result.n_examples,
                                                 result.final_metrics, bundle.digest))
    if bundle.manifest.peft_config is not None:
        save_peft_adapter(out / PEFT_DIR, result.parameters, bundle.manifest)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(f"adapter written to {out / UPDATE_FILE}" +
          (f" and {out / PEFT_DIR} (PEFT)" if bundle.manifest.peft_config is not None else ""), flush=True)
    return result, summary
