"""Local training data: read CSV / JSONL / plain text, map columns and labels, tokenise, batch.

Device side: uses ``tokenizers`` with the tokenizer file carried in the bundle, never transformers.
Batches are padded to their own longest example (dynamic padding); examples of similar length are
grouped into the same batches (length bucketing) so little compute goes to padding.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from edgeft.bundle import Bundle
from edgeft.errors import ConfigError, DataError
from edgeft.records import FORMATS, DataConfig, DataSchema, _column, read_records, targets_of  # noqa: F401

IGNORE_INDEX = -100


@dataclass
class Dataset:
    """Tokenised examples: ``ids[i]`` token ids; ``targets`` per the task (see ``_targets``). Causal LM: no
    targets; ``labels[i]`` (chat and prompt/completion data) are example i's per-token labels, -100 where there is
    no loss (without them every token is a label). ``notes``: what reading the data did, for the report (e.g. how
    many examples truncation cut or dropped)."""

    ids: list[np.ndarray]
    targets: np.ndarray | None  # None for causal LM (the labels are the ids)
    labels: list[np.ndarray] | None = None
    notes: dict = field(default_factory=dict)
    # packed causal-LM rows (``pack``): each token's segment, 1, 2, ... (the attention mask the row is batched with)
    segments: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray | list[int]) -> Dataset:
        return Dataset([self.ids[i] for i in index], None if self.targets is None else self.targets[index],
                       None if self.labels is None else [self.labels[i] for i in index], self.notes,
                       None if self.segments is None else [self.segments[i] for i in index])

    @property
    def n_tokens(self) -> int:
        return int(sum(len(x) for x in self.ids))

    @property
    def lengths(self) -> np.ndarray:
        """Each example's length, for length bucketing (every example of a fixed-shape dataset is 1 long)."""
        return np.array([len(x) for x in self.ids])

    def collate(self, index: np.ndarray, pad_id: int, train: bool = False,
                rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """The batch of the examples at ``index`` (``train``/``rng``: augmentation, for datasets that have it)."""
        return collate(self, index, pad_id)


class Encoder:
    """Tokenises text with the bundle's tokenizer file, truncating to the bundle's max length."""

    def __init__(self, bundle: Bundle):
        from tokenizers import Tokenizer

        spec = bundle.manifest.tokenizer
        if spec is None:
            raise DataError("this bundle carries no tokenizer, so it cannot read text; feed arrays instead")
        self.tokenizer = Tokenizer.from_file(str(bundle.file(spec["file"])))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = int(spec["max_length"])
        self.pad_id = int(spec["pad_id"])

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch([str(t) for t in texts])
        return [truncate(np.asarray(e.ids, dtype=np.int64), self.max_length) for e in encodings]

    def encode_stream(self, text: str) -> np.ndarray:
        """One long text as a single token stream (no special tokens), for language modelling."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def truncate(ids: np.ndarray, max_length: int) -> np.ndarray:
    """At most ``max_length`` tokens, keeping the last one (a closing special token such as [SEP])."""
    if len(ids) <= max_length:
        return ids
    return np.concatenate([ids[: max_length - 1], ids[-1:]])


def load_dataset(config: DataConfig, bundle: Bundle, encoder: Encoder | None = None) -> Dataset:
    """Read, validate and tokenise a data file for the bundle's task (images, feature tables and arrays:
    ``edgeft.inputs.load_inputs``, by the bundle's input kind)."""
    if bundle.manifest.input_kind != "tokens":
        from edgeft.inputs import load_inputs

        return load_inputs(config, bundle)  # type: ignore[return-value]
    encoder = encoder or Encoder(bundle)
    rows = read_records(config)
    manifest = bundle.manifest
    if manifest.loss == "dpo":
        from edgeft.preference import load_preferences

        return load_preferences(rows, config.path, bundle, encoder.tokenizer, encoder.max_length)  # type: ignore
    if manifest.task == "causal-lm" and rows and ("messages" in rows[0] or "prompt" in rows[0]):
        from edgeft.chat import encode_rows

        chat = encode_rows(rows, config.path, bundle, encoder.tokenizer, encoder.max_length)
        return Dataset(chat.ids, None, chat.labels,
                       {"examples": len(rows), "truncated": chat.truncated, "dropped": chat.dropped})
    texts = _column(rows, config.text_column, config)
    if manifest.task == "causal-lm":
        if config.resolved_format == "text":
            stream = encoder.encode_stream(texts[0])
            block = encoder.max_length
            if len(stream) < 2:
                raise DataError(f"{config.path} holds fewer than 2 tokens")
            return Dataset([stream[i: i + block] for i in range(0, len(stream) - 1, block)
                            if len(stream[i: i + block]) > 1], None)
        return Dataset(encoder.encode(texts), None)
    raw = _column(rows, config.label_column, config)
    return Dataset(encoder.encode(texts), targets_of(raw, manifest, config))


def split(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Random (train, validation) split holding out ``fraction`` of the examples."""
    if not 0 < fraction < 1:
        raise ConfigError(f"invalid val_fraction={fraction!r}: must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(len(dataset))
    cut = max(1, int(round(len(dataset) * fraction)))
    return dataset.subset(order[cut:]), dataset.subset(order[:cut])


def batches(dataset: Dataset, batch_size: int, pad_id: int, *, shuffle: bool = False, seed: int = 0,
            bucket_size: int = 50, train: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Padded batches; with ``shuffle``, examples are length-bucketed within windows of
    ``bucket_size`` batches and the batches come out in random order. ``train``: the training batches of
    a dataset with augmentation (images), seeded by ``seed``. Any dataset with ``lengths`` and ``collate``
    (``edgeft.inputs`` has the image and array ones)."""
    n = len(dataset)
    rng = np.random.default_rng(seed)
    if shuffle:
        order = rng.permutation(n)
        window = batch_size * bucket_size
        lengths = dataset.lengths
        chunks = [order[i: i + window] for i in range(0, n, window)]
        groups = []
        for chunk in chunks:
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            groups += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
        groups = [groups[i] for i in rng.permutation(len(groups))]
    else:
        groups = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    for group in groups:
        yield dataset.collate(group, pad_id, train=train, rng=rng)


def pack(dataset: Dataset, max_length: int) -> Dataset:
    """Causal-LM examples packed into rows of at most ``max_length`` tokens (best fit, longest first), so that
    batches of short examples carry little padding. Each row's attention mask numbers its examples 1, 2, ...:
    the bundle's graph (``manifest.packing``) lets a token attend only within its own example and restarts the
    positions there, and the first token of every example gets no label (nothing before it in its example
    predicts it), so a packed example's loss is the loss it has in a row of its own. Deterministic."""
    if dataset.targets is not None or dataset.segments is not None:
        raise ConfigError("only causal-LM examples can be packed, and only once")
    order = sorted(range(len(dataset)), key=lambda i: (-len(dataset.ids[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row), sorted: the best fit is the first with enough room
    for i in order:
        n = len(dataset.ids[i])
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (max_length - n, len(rows) - 1))
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (room - n, row))
    ids, labels, segments = [], [], []
    for row in rows:
        parts = [dataset.labels[i] if dataset.labels is not None else dataset.ids[i] for i in row]
        ids.append(np.concatenate([dataset.ids[i] for i in row]))
        labels.append(np.concatenate([np.concatenate([[IGNORE_INDEX], p[1:]]).astype(np.int64) for p in parts]))
        segments.append(np.concatenate([np.full(len(dataset.ids[i]), k, dtype=np.int64) for k, i in enumerate(row, 1)]))
    return Dataset(ids, None, labels, {**dataset.notes, "packed_rows": len(rows)}, segments)


def pad(seqs: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) of token sequences padded on the right to the longest one."""
    width = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return input_ids, mask


def collate(dataset: Dataset, index: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """Pad the examples at ``index`` to their longest one: input_ids, attention_mask, labels."""
    input_ids, mask = pad([dataset.ids[i] for i in index], pad_id)
    if dataset.segments is not None:
        for row, i in enumerate(index):
            mask[row, : len(dataset.segments[i])] = dataset.segments[i]
    if dataset.labels is not None:
        labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
        for row, i in enumerate(index):
            labels[row, : len(dataset.labels[i])] = dataset.labels[i]
    elif dataset.targets is None:
        labels = np.where(mask == 1, input_ids, IGNORE_INDEX)
    else:
        labels = dataset.targets[index]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
