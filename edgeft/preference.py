"""Preference tuning on the device: DPO (Rafailov et al., 2023) on prompt / chosen / rejected rows.

Each row becomes two sequences, the prompt with the chosen answer and with the rejected one (rendered with the
model's chat template when the bundle has one: the prompt as the user's message, the answer as the assistant's;
else ``prompt + answer + eos``), labelled on the answer's tokens only (``edgeft.chat``). A batch of B rows is the B
chosen sequences then the B rejected ones; its labels ([2B, T + 1], float) end with each sequence's reference
log-probability, which the bundle's ``dpo`` loss reads (``edgeft.export.losses.dpo``).

The reference model is the frozen base: the bundle's parameters as exported (LoRA's B matrices at zero). The device
computes every sequence's reference log-probability once, with its own eval graph at those parameters, before it
trains (``ensure_reference``), so no second model is held. Validation reports the DPO loss, the preference accuracy
(how often the chosen answer's reward beats the rejected one's) and the mean reward margin, rewards being
``beta * (log pi - log pi_ref)``. Never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from edgeft.chat import IGNORE_INDEX, bundle_template, cut_to, label_tokens
from edgeft.errors import DataError
from edgeft.train.metrics import log_softmax


@dataclass
class PreferenceDataset:
    """Pairs of (token ids, labels): ``chosen[i]`` and ``rejected[i]`` answer the same prompt. ``reference[i]``:
    the two sequences' reference log-probabilities, once ``ensure_reference`` has computed them."""

    chosen: list[tuple[np.ndarray, np.ndarray]]
    rejected: list[tuple[np.ndarray, np.ndarray]]
    reference: np.ndarray | None = None  # [N, 2]
    notes: dict = field(default_factory=dict)
    targets = None  # no class targets (what class_statistics checks)

    def __len__(self) -> int:
        return len(self.chosen)

    def subset(self, index: np.ndarray | list[int]) -> PreferenceDataset:
        index = [int(i) for i in index]
        return PreferenceDataset([self.chosen[i] for i in index], [self.rejected[i] for i in index],
                                 None if self.reference is None else self.reference[index], self.notes)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([max(len(c[0]), len(r[0])) for c, r in zip(self.chosen, self.rejected)])

    def collate(self, index: np.ndarray, pad_id: int, train: bool = False,
                rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """input_ids and attention_mask of the chosen then the rejected sequences, right-padded; float labels with
        the reference log-probability appended (0 before ``ensure_reference``)."""
        pairs = [self.chosen[i] for i in index] + [self.rejected[i] for i in index]
        width = max(len(ids) for ids, _ in pairs)
        input_ids = np.full((len(pairs), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(pairs), width), dtype=np.int64)
        labels = np.full((len(pairs), width + 1), IGNORE_INDEX, dtype=np.float32)
        for row, (ids, token_labels) in enumerate(pairs):
            input_ids[row, : len(ids)], mask[row, : len(ids)], labels[row, : len(ids)] = ids, 1, token_labels
        reference = (np.zeros(len(pairs)) if self.reference is None else
                     np.concatenate([self.reference[index, 0], self.reference[index, 1]]))
        labels[:, -1] = reference
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def load_preferences(rows: Sequence[Mapping], source: object, bundle, tokenizer,  # noqa: ANN001
                     max_length: int) -> PreferenceDataset:
    """Rows with a string ``prompt`` and non-empty string ``chosen`` and ``rejected`` answers, tokenised and cut to
    ``max_length`` (a pair loses both when either answer lies wholly beyond the cut; counted in ``notes``)."""
    template = bundle_template(bundle)
    eos = (bundle.manifest.tokenizer or {}).get("eos_token") or ""
    chosen, rejected, truncated, dropped = [], [], 0, 0
    for number, row in enumerate(rows, 1):
        prompt = row.get("prompt")
        answers = [row.get("chosen"), row.get("rejected")]
        if not isinstance(prompt, str) or not all(isinstance(a, str) and a.strip() for a in answers):
            empty = next((k for k, a in zip(("chosen", "rejected"), answers) if not (isinstance(a, str) and a.strip())),
                         "prompt")
            raise DataError(f"{source} row {number}: a preference row needs a string 'prompt' and non-empty "
                            f"'chosen' and 'rejected' answers; its {empty!r} is missing or empty")
        pair = []
        for answer in answers:
            if template is not None:
                text, spans = template.assistant_spans([{"role": "user", "content": prompt},
                                                        {"role": "assistant", "content": answer}])
            else:
                text = prompt + answer + eos
                spans = [(len(prompt), len(text))]
            pair.append(cut_to(*label_tokens(tokenizer, text, spans), max_length))
        if any(not (labels != IGNORE_INDEX).any() for _, labels, _ in pair):
            dropped += 1
            continue
        truncated += int(any(cut for *_, cut in pair))
        chosen.append(pair[0][:2])
        rejected.append(pair[1][:2])
    if not chosen:
        raise DataError(f"{source}: every preference pair has an answer beyond max_length={max_length} tokens; "
                        "export the bundle with a larger --max-length or shorten the prompts")
    return PreferenceDataset(chosen, rejected, notes={"examples": len(rows), "truncated": truncated,
                                                      "dropped": dropped})


def sequence_logps(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's summed next-token log-probability of its labelled tokens (labels [rows, T], -100 not counted)."""
    targets = labels[:, 1:].astype(np.int64)
    keep = targets != IGNORE_INDEX
    logp = log_softmax(logits[:, :-1, :].astype(np.float64))
    picked = np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], axis=2)[..., 0]
    return (picked * keep).sum(axis=1)


def ensure_reference(session, dataset: PreferenceDataset, batch_size: int, pad_id: int,  # noqa: ANN001
                     base: Mapping[str, np.ndarray]) -> None:
    """Fill ``dataset.reference`` (once) with the frozen base's log-probabilities: the session's eval graph at the
    ``base`` parameters (``edgeft.train.engines.initial_parameters``: the bundle as exported); the session's own
    parameters are put back afterwards."""
    if dataset.reference is not None or not len(dataset):
        return
    current = session.get_parameters()
    session.set_parameters(dict(base), proximal_anchor=False)
    reference = np.zeros((len(dataset), 2))
    try:
        for start in range(0, len(dataset), batch_size):
            index = np.arange(start, min(start + batch_size, len(dataset)))
            batch = dataset.collate(index, pad_id)
            _, logits = session.eval_step(batch)
            logps = sequence_logps(np.asarray(logits), batch["labels"][:, :-1])
            reference[index, 0], reference[index, 1] = logps[: len(index)], logps[len(index):]
    finally:
        session.set_parameters(current, proximal_anchor=False)
    dataset.reference = reference


class PreferenceAccumulator:
    """DPO's validation metrics over batches of (logits, float labels with the reference appended)."""

    def __init__(self, beta: float):
        self.beta = beta
        self.margins: list[np.ndarray] = []

    def add(self, logits: np.ndarray, labels: np.ndarray) -> None:
        rewards = self.beta * (sequence_logps(logits, labels[:, :-1]) - labels[:, -1].astype(np.float64))
        half = len(rewards) // 2
        self.margins.append(rewards[:half] - rewards[half:])

    def result(self) -> dict[str, float]:
        margins = np.concatenate(self.margins) if self.margins else np.zeros(0)
        loss = np.logaddexp(0.0, -margins)  # -log sigmoid(margin)
        return {"loss": float(loss.mean()) if len(margins) else 0.0,
                "preference_accuracy": float((margins > 0).mean()) if len(margins) else 0.0,
                "reward_margin": float(margins.mean()) if len(margins) else 0.0, "pairs": int(len(margins))}
