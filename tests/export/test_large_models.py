"""Models whose fp32 weights exceed 2 GB: the portable engine exports them (frozen weights in ONNX external data;
bench/large_export.py measures a 2.5 GB causal LM end to end), the ort-training engine refuses them at once with an
ExportError that names the size and the portable engine, instead of failing deep in ONNX or ORT. Modules built on
the meta device: no memory, no export work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeft.config import ExportConfig
from edgeft.errors import ExportError
from edgeft.export import export_source
from edgeft.export.artifacts import refuse_oversized
from edgeft.export.source import ModelSource


def embedding_model(rows: int, width: int = 2048) -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Embedding(rows, width), nn.Linear(width, 2))


def test_ort_training_refuses_a_model_over_2gb_and_names_the_portable_engine(tmp_path):
    model = embedding_model(300_000)  # 2.29 GiB in fp32
    source = ModelSource(model=model, input_names=["ids"], example_inputs={"ids": torch.zeros(2, 3, dtype=torch.long)},
                         dynamic_axes={}, base_id="large", base_digest="0", input_kind="arrays")
    with pytest.raises(ExportError, match=r"2\.29 GiB in fp32; the ort-training engine cannot export over 1\.94 GiB "
                                          r".* engine='portable'"):
        export_source(source, tmp_path / "bundle", ExportConfig(labels=("a", "b"), engine="ort-training"))
    assert not (tmp_path / "bundle").exists()


def test_the_limit_counts_tied_weights_once():
    refuse_oversized(embedding_model(250_000))  # 1.91 GiB: under the limit
    with pytest.raises(ExportError, match="1.96 GiB"):
        refuse_oversized(embedding_model(257_000))
    with torch.device("meta"):
        embedding, output = nn.Embedding(150_000, 2048), nn.Linear(2048, 150_000, bias=False)  # 1.14 GiB each
    with pytest.raises(ExportError, match="2.29 GiB"):
        refuse_oversized(nn.Sequential(embedding, output))
    output.weight = embedding.weight  # the output layer tied to the embedding (GPT-2, Qwen2.5-0.5B)
    refuse_oversized(nn.Sequential(embedding, output))
