"""The portable engine's gradient checkpointing on the device: a causal LM's training step run layer by layer
(``edgeft.export.segmented`` writes the graphs).

One step: the prologue embeds the batch and makes the attention mask and rotary tables; the layer graph runs once
per decoder layer, keeping each layer's input; the head graph gives the summed next-token loss and its gradient with
respect to the last hidden state, a row at a time (the vocabulary-sized logits of one row exist at once); then, last
layer first, the layer-gradient graph recomputes each layer from its kept input and returns the gradient with
respect to that input and to the layer's trainable weights. Between the two passes the process holds one
[batch, sequence, hidden] tensor per layer, not every intermediate activation (with ``keep_projections``
also the outputs of the layer's input projections, which the layer-gradient graph then reads instead of recomputing). Every layer's frozen weights are held
once (in ``base_bits`` when the bundle was exported so), and fed to the one layer graph; the optimizer is the
portable engine's. Never imports torch.
"""

from __future__ import annotations

import numpy as np

from edgeft.bundle import (GRAD_PREFIX, OUT_SUFFIX, SEGMENTED_HEAD, SEGMENTED_HEAD_GRAD, SEGMENTED_LAYER,
                           SEGMENTED_LAYER_GRAD, SEGMENTED_LAYERS, SEGMENTED_PROLOGUE, Bundle)
from edgeft.errors import BundleError, TrainingError
from edgeft.train.portable import PortableSession

HEAD_ROWS = 1  # rows of the batch per head call


class SegmentedSession(PortableSession):
    """A ``PortableSession`` for bundles exported with gradient checkpointing (``manifest.segmented``)."""

    def _open_graphs(self, bundle: Bundle, threads: int | None, files: dict[str, np.ndarray]) -> None:
        from safetensors.numpy import load_file

        layout = bundle.manifest.segmented
        if not layout:
            raise BundleError(f"the bundle at {bundle.path} was not exported with gradient checkpointing")
        # The layer graphs run 2 x layers times a step with the same shapes: ONNX Runtime's arena keeps their memory
        # between calls (measured at Qwen2.5-0.5B's shape: 35% faster than without). The head's and the prologue's
        # calls are few and large (a row's vocabulary-sized logits): without the arena they give their memory back
        # and the step peaks at the largest call, not at the sum of all (1.0 GB less there).
        def session(name: str, arena: bool, fed_weights: bool = False):  # noqa: ANN202
            return self._session(bundle.file(name), threads, files, arena=arena, fed_weights=fed_weights)

        self._prologue = session(SEGMENTED_PROLOGUE, arena=False)
        self._head, self._head_grad = session(SEGMENTED_HEAD, arena=False), session(SEGMENTED_HEAD_GRAD, arena=False)
        self._layer = session(SEGMENTED_LAYER, arena=True, fed_weights=True)
        self._layer_grad = session(SEGMENTED_LAYER_GRAD, arena=True, fed_weights=True)
        self._kept_names: list[str] = list(layout.get("kept", []))  # keep_projections: handed to the backward
        stored = load_file(str(bundle.file(SEGMENTED_LAYERS)))
        trainable, quantised = set(layout["trainable"]), set(layout["quantised"])
        self._frozen: list[dict[str, np.ndarray]] = []
        self._trainable_of: list[dict[str, str]] = []  # a layer's local trainable name -> the bundle's name
        try:
            for i in range(int(layout["layers"])):
                feeds = {}
                for name in layout["weights"]:
                    if name in quantised:
                        feeds[name + ".q"], feeds[name + ".scale"] = stored[f"{i}.{name}.q"], stored[f"{i}.{name}.scale"]
                    elif name not in trainable:
                        feeds[name] = stored[f"{i}.{name}"]
                self._frozen.append(feeds)
                self._trainable_of.append({n: f"{layout['prefix']}.{i}.{n}" for n in layout["trainable"]})
        except KeyError as exc:
            raise BundleError(f"{SEGMENTED_LAYERS} in the bundle at {bundle.path} lacks the weight {exc}; re-export "
                              "the bundle") from exc

    def _layer_feeds(self, i: int, hidden: np.ndarray, context: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        params = {local: self._params[name].numpy() for local, name in self._trainable_of[i].items()}
        return {"hidden": hidden, **context, **self._frozen[i], **params}

    def _run(self, session, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:  # noqa: ANN001
        try:
            return session.run(outputs, feeds)
        except Exception as exc:
            raise TrainingError(f"ONNX Runtime failed on this batch: {str(exc).strip().splitlines()[0]}") from exc

    def _forward(self, batch: dict[str, np.ndarray], keep: bool) -> tuple[np.ndarray, dict, list[dict]]:
        """(the last hidden state, the mask and rotary tables, and when ``keep`` each layer's input and the
        activations its forward hands to its backward: feeds for the layer-gradient graph)."""
        self._check_batch(batch)
        hidden, mask, cos, sin = self._run(self._prologue, {"input_ids": np.ascontiguousarray(batch["input_ids"]),
                                                           "attention_mask": np.ascontiguousarray(
                                                               batch["attention_mask"])})
        context = {"mask": mask, "cos": cos, "sin": sin}
        kept = []
        wanted = None if keep else ["hidden" + OUT_SUFFIX]
        for i in range(len(self._frozen)):
            out = self._run(self._layer, self._layer_feeds(i, hidden, context), wanted)
            if keep:
                kept.append({"hidden": hidden, **dict(zip(self._kept_names, out[1:]))})
            hidden = out[0]
        return hidden, context, kept

    def _head_rows(self, hidden: np.ndarray, labels: np.ndarray, grad: bool) -> tuple[float, int, np.ndarray | None]:
        """The summed loss and labelled-token count over the batch, and (``grad``) the summed loss's gradient with
        respect to ``hidden``, computed HEAD_ROWS rows at a time."""
        labels = np.ascontiguousarray(labels)
        total, count = 0.0, 0
        grads = np.empty_like(hidden) if grad else None
        for r in range(0, hidden.shape[0], HEAD_ROWS):
            out = self._run(self._head_grad if grad else self._head,
                            {"hidden": hidden[r: r + HEAD_ROWS], "labels": labels[r: r + HEAD_ROWS]})
            total, count = total + float(out[0]), count + int(out[1])
            if grad:
                grads[r: r + HEAD_ROWS] = out[2]
        return total, count, grads

    def train_step(self, batch: dict[str, np.ndarray]) -> tuple[float, None]:
        """Forward + backward on one batch (the mean next-token loss over its labelled tokens); gradients add up
        until ``optimizer_step``. No logits: they are never whole at once."""
        hidden, context, kept = self._forward(batch, keep=True)
        total, count, grad = self._head_rows(hidden, batch["labels"], grad=True)
        if count == 0:  # nothing labelled: PyTorch's mean over no tokens
            return float("nan"), None
        grad = (grad / np.float32(count)).astype(np.float32)
        for i in reversed(range(len(self._frozen))):
            out = self._run(self._layer_grad, {**self._layer_feeds(i, kept[i].pop("hidden"), context), **kept[i],
                                               GRAD_PREFIX + "hidden" + OUT_SUFFIX: grad})
            kept[i] = None
            grad = out[0]
            for name, value in zip(self._trainable_of[i].values(), out[1:]):
                self._grads[name] = self._value(self._grads[name].numpy() + value)
        return total / count, None

    def loss_sums(self, batch: dict[str, np.ndarray]) -> tuple[float, int]:
        """Forward only: the summed next-token loss over the batch's labelled tokens and their number."""
        hidden, _, _ = self._forward(batch, keep=False)
        total, count, _ = self._head_rows(hidden, batch["labels"], grad=False)
        return total, count

    def eval_step(self, batch: dict[str, np.ndarray]) -> tuple[float, None]:
        """Forward only: (the mean next-token loss, no logits)."""
        total, count = self.loss_sums(batch)
        return (total / count if count else float("nan")), None

    def features(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        raise TrainingError("a causal LM's bundle has no 'features' output")
