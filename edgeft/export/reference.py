"""The PyTorch + PEFT twin of a bundle: same graph, same initial weights, trained eagerly in torch.

Used by the parity tests and the benchmarks to compare ONNX Runtime training with the usual PyTorch
recipe measured in the same run. Coordinator side only (imports torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgeft.bundle import Bundle
from edgeft.config import ExportConfig
from edgeft.export.adapters import apply_adapter
from edgeft.export.graph import TrainingGraph
from edgeft.export.source import ModelSource
from edgeft.train.engines import open_session


@dataclass
class Reference:
    """A torch model (PEFT-wrapped for LoRA) holding the bundle's initial trainable weights."""

    graph: TrainingGraph
    optimizer: torch.optim.Optimizer
    trainable: dict[str, torch.nn.Parameter]

    def step(self, batch: dict[str, np.ndarray], learning_rate: float, *, apply: bool = True) -> float:
        """Forward + backward on one batch; with ``apply`` an optimizer step at ``learning_rate``."""
        args = [torch.from_numpy(batch[n]) for n in self.graph.input_names] + [torch.from_numpy(batch["labels"])]
        loss, _ = self.graph(*args)
        loss.backward()
        if apply:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        args = [torch.from_numpy(batch[n]) for n in self.graph.input_names] + [torch.from_numpy(batch["labels"])]
        return self.graph(*args)[1].numpy()

    def parameters(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self.trainable.items()}


def reference_for(source: ModelSource, config: ExportConfig, bundle: Bundle, dropout: bool = False) -> Reference:
    """Build the torch twin of ``bundle`` (either engine) from the same source; ``dropout`` trains in train mode.

    Gradients add up over ``Reference.step(..., apply=False)`` calls as the bundle's do over ``train_step``."""
    adapted = apply_adapter(source, config.adapter, config.task)
    initial = open_session(bundle).get_parameters()
    params = dict(adapted.model.named_parameters())
    with torch.no_grad():
        for name, value in initial.items():
            params[name].copy_(torch.from_numpy(value))
    opt = config.optimizer
    l2 = opt.weight_decay if opt.name == "sgd" else 0.0
    # FedProx: the anchors start at the initial parameters, as the bundle's do
    graph = TrainingGraph(adapted.model, source.input_names, config.loss, l2, source.prepare_inputs,
                          config.proximal_mu, adapted.trainable, dpo_beta=config.dpo_beta)
    graph.train(dropout)
    trainable = {n: params[n] for n in adapted.trainable}
    if opt.name == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(list(trainable.values()), lr=0.0, betas=opt.betas,
                                                              eps=opt.eps, weight_decay=opt.weight_decay)
    else:
        optimizer = torch.optim.SGD(list(trainable.values()), lr=0.0)
    return Reference(graph, optimizer, trainable)
