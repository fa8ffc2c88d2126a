"""Local fine-tuning of a bundle on a device's data: the loop ``edgeft train`` and the agent run.

Warm-up + linear-decay learning rate, gradient accumulation, epochs or a step budget, an evaluation
after every epoch and early stopping on the validation split. Never imports torch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from edgeft.bundle import Bundle
from edgeft.config import TrainConfig
from edgeft.data import Dataset, batches, pack
from edgeft.errors import ConfigError, TrainingError
from edgeft.train.cached import cached_head
from edgeft.train.metrics import Accumulator, higher_is_better
from edgeft.train.schedule import warmup_linear
from edgeft.train.engines import initial_parameters, open_session

EVAL_BATCH_SIZE = 64


@dataclass
class TrainResult:
    """What a local run produced and its history: the last parameters, or with early stopping the
    parameters of the best validation epoch."""

    parameters: dict[str, np.ndarray]
    history: list[dict] = field(default_factory=list)
    n_examples: int = 0
    steps: int = 0
    best_epoch: int | None = None
    stopped_early: bool = False
    interrupted: bool = False  # ``should_stop`` ended training before its planned steps

    @property
    def final_metrics(self) -> dict:
        if not self.history:
            return {}
        record = self.history[(self.best_epoch or len(self.history)) - 1]
        return {k: v for k, v in record.items() if k.startswith(("val_", "train_"))}


def pad_id_of(bundle: Bundle) -> int:
    return int(bundle.manifest.tokenizer["pad_id"]) if bundle.manifest.tokenizer else 0


def evaluate(session, dataset: Dataset, task: str, pad_id: int,
             batch_size: int = EVAL_BATCH_SIZE, bundle: Bundle | None = None) -> dict[str, float]:
    """The task's metrics of the session's current parameters on ``dataset`` (a DPO ``bundle``'s preference pairs:
    DPO loss, preference accuracy and reward margin, against the frozen base)."""
    order = np.argsort(dataset.lengths, kind="stable")
    if bundle is not None and bundle.manifest.loss == "dpo":
        from edgeft.preference import PreferenceAccumulator, ensure_reference

        if dataset.reference is None:  # type: ignore[attr-defined]  (computed once per dataset)
            ensure_reference(session, dataset, batch_size, pad_id, initial_parameters(bundle))  # type: ignore
        acc = PreferenceAccumulator(float((bundle.manifest.loss_options or {}).get("beta", 0.1)))
    else:
        acc = Accumulator(task)
    for batch in batches(dataset.subset(order), batch_size, pad_id):
        if hasattr(session, "loss_sums"):  # gradient checkpointing: no vocabulary-sized logits of a whole batch
            acc.add_sums(*session.loss_sums(batch))
            continue
        _, logits = session.eval_step(batch)
        acc.add(logits, batch["labels"])
    return acc.result()


def class_statistics(session, dataset: Dataset, num_classes: int, pad_id: int,
                     batch_size: int = EVAL_BATCH_SIZE) -> tuple[dict[str, np.ndarray], int]:
    """The statistics round on a device: one forward pass over ``dataset`` (no training) summed per class
    (``edgeft.aggregate.statistics``); returns the tensors to upload and the number of examples."""
    from edgeft.aggregate.statistics import StatisticsAccumulator

    if dataset.targets is None or dataset.targets.ndim != 1:
        raise TrainingError("class statistics need single-label classification data")
    order = np.argsort(dataset.lengths, kind="stable")
    acc = None
    for batch in batches(dataset.subset(order), batch_size, pad_id):
        features = session.features(batch)
        acc = acc or StatisticsAccumulator(num_classes, features.shape[1])
        acc.add(features, batch["labels"])
    if acc is None:
        raise TrainingError("the device has no examples for the statistics round")
    return acc.tensors(), len(dataset)


def packed(bundle: Bundle, dataset: Dataset) -> Dataset:
    """``dataset`` packed into rows of the bundle's max_length (``TrainConfig.pack``), or a ConfigError saying why
    this bundle cannot pack."""
    manifest = bundle.manifest
    if manifest.task != "causal-lm" or manifest.loss == "dpo":
        raise ConfigError("pack: packing is for causal-LM training examples (not classification data or DPO's "
                          "preference pairs); train without --pack")
    if not manifest.packing:
        raise ConfigError("pack: this causal-LM bundle was exported before edgeft could pack examples (its graphs "
                          "would let packed examples attend to each other); export it again, or train without --pack")
    return pack(dataset, int(manifest.tokenizer["max_length"]))


def plan_steps(n_examples: int, config: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    micro = math.ceil(n_examples / config.batch_size)
    per_epoch = math.ceil(micro / config.grad_accum_steps)
    total = config.max_steps if config.max_steps is not None else per_epoch * config.epochs
    return per_epoch, total


def train(bundle: Bundle, train_data: Dataset, config: TrainConfig, val_data: Dataset | None = None,
          session=None,
          on_epoch: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Fine-tune the bundle's trainable parameters on ``train_data``; evaluate on ``val_data`` each epoch.

    The validation split is evaluated in batches of the training batch size, so evaluation needs no more memory
    than training does. ``should_stop`` is asked after every optimizer step: True ends training there, at that step boundary (the
    epoch so far is recorded and evaluated; ``TrainResult.interrupted``), e.g. to meet a round's deadline."""
    if len(train_data) == 0:
        raise ConfigError("the training data is empty")
    if config.early_stopping_patience and val_data is None:
        raise ConfigError("early_stopping_patience needs a validation split (--val or --val-fraction)")
    session = session or open_session(bundle, threads=config.threads, provider=config.provider)
    cached = cached_head(bundle, session, train_data, val_data, config)
    if cached is not None:  # the head alone on the backbone's features, computed once
        result = train(cached.bundle, cached.train, replace(config, cache_features=False), cached.val,
                       cached.session, on_epoch, should_stop)
        session.set_parameters(result.parameters, proximal_anchor=False)
        return result
    task, pad_id = bundle.manifest.task, pad_id_of(bundle)
    n_examples = len(train_data)
    if config.pack:
        train_data = packed(bundle, train_data)
    if bundle.manifest.loss == "dpo":  # the frozen base's log-probabilities, before any step moves the adapter
        from edgeft.preference import ensure_reference

        if train_data.reference is None:  # type: ignore[attr-defined]  (computed once per dataset)
            ensure_reference(session, train_data, config.batch_size, pad_id,  # type: ignore[arg-type]
                             initial_parameters(bundle))
    per_epoch, total = plan_steps(len(train_data), config)
    warmup = int(round(total * config.warmup_ratio))
    # ORT sums accumulated gradients; AdamW is invariant to that scale, SGD is not.
    lr_scale = 1.0 / config.grad_accum_steps if bundle.manifest.optimizer.get("name") == "sgd" else 1.0
    metric = config.early_stopping_metric
    result = TrainResult(parameters={}, n_examples=n_examples)
    best_value, bad_epochs, step, epoch = None, 0, 0, 0
    bar = tqdm(total=total, desc="train", unit="step", disable=not config.progress, dynamic_ncols=True)
    started = time.perf_counter()
    while step < total:
        epoch += 1
        losses, micro = [], 0
        for batch in batches(train_data, config.batch_size, pad_id, shuffle=True, train=True,
                             seed=config.seed + epoch, bucket_size=config.bucket_size):
            loss, _ = session.train_step(batch)
            if not math.isfinite(loss):
                raise TrainingError(f"the training loss became {loss} at step {step}; lower the learning rate")
            losses.append(loss)
            micro += 1
            if micro % config.grad_accum_steps == 0:
                session.optimizer_step(warmup_linear(step, total, warmup, config.learning_rate) * lr_scale)
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-20:]):.4f}")
                if step >= total:
                    break
                if should_stop is not None and should_stop():
                    result.interrupted = True
                    break
        if micro % config.grad_accum_steps and step < total and not result.interrupted:  # a last partial accumulation
            session.optimizer_step(warmup_linear(step, total, warmup, config.learning_rate) * lr_scale)
            step += 1
            bar.update(1)
        record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)),
                  "seconds": round(time.perf_counter() - started, 2)}
        if val_data is not None and len(val_data):
            record.update({f"val_{k}": v for k, v in evaluate(session, val_data, task, pad_id, config.batch_size, bundle).items()})
        result.history.append(record)
        if on_epoch:
            on_epoch(record)
        if result.interrupted:
            break
        if val_data is not None and config.early_stopping_patience:
            key = f"val_{metric}"
            if key not in record:
                raise ConfigError(f"invalid early_stopping_metric={metric!r}: evaluation reports "
                                  f"{', '.join(k[4:] for k in record if k.startswith('val_'))}")
            value = record[key]
            improved = best_value is None or (value > best_value if higher_is_better(metric) else value < best_value)
            if improved:
                best_value, bad_epochs, result.best_epoch = value, 0, epoch
                result.parameters = session.get_parameters()
            else:
                bad_epochs += 1
                if config.early_stopping_patience and bad_epochs >= config.early_stopping_patience:
                    result.stopped_early = True
                    break
    bar.close()
    result.steps = step
    if result.parameters:
        session.set_parameters(result.parameters, proximal_anchor=False)  # keep the best epoch's weights
    else:
        result.parameters = session.get_parameters()
    return result
