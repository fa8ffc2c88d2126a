"""Head-only training on cached features: the frozen backbone runs once per example, the head trains alone.

A head-only bundle of a model that does not read text carries a head bundle (``pooling["head_bundle"]``, a folder
inside it) whose graphs read the head's input, ``features``, instead of the model's. When the training examples
are the same every epoch (arrays, feature columns, or images without augmentation), ``edgeft.train.trainer.train``
computes every example's features once with the bundle's eval graph and trains the head bundle on them: the same
parameters, the same batches and the same updates as the full forward pass (the backbone is frozen and training
graphs run in eval mode), at the cost of one forward pass per example instead of one per example and epoch.
Never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from edgeft.bundle import Bundle, load_bundle
from edgeft.config import TrainConfig
from edgeft.data import batches
from edgeft.inputs import ArrayDataset, ImageDataset
from edgeft.train.engines import open_session

FEATURES = "features"  # the head bundle's input


@dataclass
class CachedHead:
    """The head bundle, a session on it holding the main session's parameters, and the cached features."""

    bundle: Bundle
    session: object
    train: ArrayDataset
    val: ArrayDataset | None


def head_bundle(bundle: Bundle) -> Bundle | None:
    """The head bundle inside ``bundle`` (verified with it by ``load_bundle``), or None when it has none."""
    folder = (bundle.manifest.pooling or {}).get("head_bundle")
    return load_bundle(bundle.file(folder), verify=False) if folder else None


def fixed_examples(dataset: object) -> bool:
    """Whether every epoch feeds the model the same values: arrays, or images without training augmentation."""
    if isinstance(dataset, ArrayDataset):
        return True
    return isinstance(dataset, ImageDataset) and not dataset.preprocessing.augment


def cached_head(bundle: Bundle, session, train_data: object, val_data: object | None,  # noqa: ANN001
                config: TrainConfig) -> CachedHead | None:
    """The cached-feature plan for this run, or None when it does not apply (no head bundle, examples that change
    between epochs, ``config.cache_features`` off)."""
    if not config.cache_features or not fixed_examples(train_data) \
            or (val_data is not None and not fixed_examples(val_data)):
        return None
    head = head_bundle(bundle)
    if head is None:
        return None
    head_session = open_session(head, threads=config.threads, provider=config.provider)
    head_session.set_parameters(session.get_parameters())  # FedProx: the anchor is the round's start, as in session
    train = feature_dataset(session, train_data, config.progress, config.batch_size)
    val = (feature_dataset(session, val_data, False, config.batch_size) if val_data is not None and len(val_data)
           else None)
    return CachedHead(head, head_session, train, val)


def feature_dataset(session, dataset: ArrayDataset | ImageDataset, progress: bool,  # noqa: ANN001
                    batch_size: int) -> ArrayDataset:
    """Every example's features (the head's input) from ``session``'s eval graph, in the dataset's order, in
    batches of the training batch size (so the pass needs no more memory than training)."""
    parts = []
    with tqdm(total=len(dataset), desc="features", unit="example", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches(dataset, batch_size, 0):
            parts.append(np.asarray(session.features(batch), dtype=np.float32))
            bar.update(len(parts[-1]))
    return ArrayDataset({FEATURES: np.concatenate(parts)}, np.asarray(dataset.targets))
