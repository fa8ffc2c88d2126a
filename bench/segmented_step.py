"""A prototype of activation recomputation for causal-LM training, measured: the training step run as several
ONNX graphs instead of one, so that only each decoder layer's input is kept between the forward and the backward pass.

Not the product: no bundle, no agent, no low-bit base. It measures what docs/performance.md's "The same at
Qwen2.5-0.5B's shape" section proposes, to size that work:
- ``layer_fwd.onnx``: one decoder layer, its weights (frozen and LoRA) as graph inputs, so one graph serves every layer;
- ``layer_vjp.onnx``: the same layer recomputed and differentiated: (layer input, output gradient) -> input gradient
  and LoRA gradients (traced with make_fx through torch.autograd.grad, then core ATen, then torch.onnx);
- ``head.onnx``: final norm, LM head and the summed next-token loss with its gradient, run one row at a time so the
  vocabulary-sized logits exist for one row only.
The step in numpy + onnxruntime (no torch in that process): embedding lookup, 24 forward calls keeping each layer's
input, the head per row, 24 recompute-and-differentiate calls in reverse.

    python bench/segmented_step.py [--model FOLDER] [--batch 4] [--seq 256] [--json-out FILE]
    python bench/segmented_step.py --check   # loss and LoRA gradients against PyTorch + PEFT on a tiny Llama

--model defaults to bench/llm.py's Qwen2.5-0.5B-shaped folder (runs/bench/llm/train-qwen2.5-0.5b-24-layers; run
``bench/llm.py --parts train --shape qwen2.5-0.5b --layers 0`` once to build it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(folder: Path, out: Path) -> None:
    import time

    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    base = model.base_model.model.model
    layer = base.layers[0]
    names = [n for n, _ in layer.named_parameters()]
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    H = model.config.hidden_size
    B, T = 2, 8
    h, mask, g = torch.randn(B, T, H), torch.zeros(B, 1, T, T), torch.randn(B, T, H)
    pos = torch.arange(T)[None].expand(B, T)
    cos, sin = base.rotary_emb(h, pos)
    params = {n: p.detach() for n, p in layer.named_parameters()}

    def fwd(h, mask, cos, sin, *ws):
        return torch.func.functional_call(layer, dict(zip(names, ws)), (h,), {"attention_mask": mask, "position_embeddings": (cos, sin)})

    def vjp(h, mask, cos, sin, g, *ws):
        ws = [w.detach().requires_grad_(n in trainable) for n, w in zip(names, ws)]
        h = h.detach().requires_grad_(True)
        o = torch.func.functional_call(layer, dict(zip(names, ws)), (h,), {"attention_mask": mask, "position_embeddings": (cos, sin)})
        o = o[0] if isinstance(o, tuple) else o
        grads = torch.autograd.grad(o, [h] + [w for n, w in zip(names, ws) if n in trainable], g)
        return tuple(grads)

    norm_w, emb = base.norm.weight.detach(), base.embed_tokens.weight.detach()
    def head(h, labels, norm_w, emb):
        h = h.detach().requires_grad_(True)
        var = h.pow(2).mean(-1, keepdim=True)
        y = h * torch.rsqrt(var + model.config.rms_norm_eps) * norm_w
        logits = y @ emb.t()
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        tgt = labels[:, 1:]
        keep = (tgt != -100)
        picked = lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss_sum = -(picked * keep).sum()
        (gh,) = torch.autograd.grad(loss_sum, [h])
        return loss_sum.detach(), keep.sum(), gh

    def export(fn, args, dyn, path, in_names, out_names):
        s = time.time()
        gm = make_fx(fn, decomposition_table=core_aten_decompositions(), tracing_mode="symbolic", _allow_non_fake_inputs=True)(*args)
        class M(nn.Module):
            def __init__(self, gm):
                super().__init__()
                self.gm = gm
            def forward(self, *a): return self.gm(*a)
        prog = torch.export.export(M(gm), tuple(args), dynamic_shapes=(dyn,), strict=False)
        onnx_prog = torch.onnx.export(prog, dynamo=True, optimize=False, verbose=False, input_names=in_names, output_names=out_names)
        onnx_prog.save(str(path))
        print(path.name, round(time.time() - s, 1), "s", len(onnx_prog.model_proto.graph.node), "nodes", file=sys.stderr)

    Bd, Td = torch.export.Dim("batch"), torch.export.Dim("seq", min=3)
    ws = [params[n] for n in names]
    wdyn = tuple(None for _ in ws)
    common = ({0: Bd, 1: Td}, {0: Bd, 2: Td, 3: Td}, {0: Bd, 1: Td}, {0: Bd, 1: Td})
    export(fwd, (h, mask, cos, sin, *ws), common + wdyn, out / "layer_fwd.onnx", ["h", "mask", "cos", "sin", *names], ["h_out"])
    export(vjp, (h, mask, cos, sin, g, *ws), common + ({0: Bd, 1: Td},) + wdyn, out / "layer_vjp.onnx",
           ["h", "mask", "cos", "sin", "grad_out", *names], ["grad_h", *("grad." + n for n in trainable)])
    labels = torch.randint(0, 100, (B, T))
    export(head, (h, labels, norm_w, emb), ({0: Bd, 1: Td}, {0: Bd, 1: Td}, None, None), out / "head.onnx",
           ["h", "labels", "norm", "embed"], ["loss_sum", "count", "grad_h"])
    json.dump({"names": names, "trainable": trainable, "layers": len(base.layers), "rope_theta": model.config.rope_theta,
               "head_dim": getattr(model.config, "head_dim", None) or H // model.config.num_attention_heads,
               "eps": model.config.rms_norm_eps}, open(out / "meta.json", "w"))
    # the per-layer weights, the embedding and norm, as one npz of float32 (the spike's stand-in for a bundle's frozen file)
    arrays = {}
    for i, l in enumerate(base.layers):
        for n, p in l.named_parameters():
            arrays[f"{i}/{n}"] = p.detach().numpy()
    arrays["norm"] = norm_w.numpy(); arrays["embed"] = emb.numpy()
    np.savez(out / "weights.npz", **arrays)
    tied = model.config.tie_word_embeddings
    if not tied:
        np.save(out / "lm_head.npy", model.base_model.model.lm_head.weight.detach().numpy())


def run(work: Path, batch: int, seq: int, seed: int = 0) -> tuple[dict, dict]:
    """The measured step (3 steps, the median of the last two); returns (figures, last step's LoRA gradients)."""
    import time

    import numpy as np
    import onnxruntime as ort

    from memory import peak_rss_mb

    d, B, T, chunk = str(work), batch, seq, 1
    meta = json.load(open(f"{d}/meta.json"))
    w = dict(np.load(f"{d}/weights.npz"))
    if Path(f"{d}/lm_head.npy").is_file():
        w["lm_head"] = np.load(f"{d}/lm_head.npy")
    weights_mb = sum(a.nbytes for a in w.values()) / 2**20
    o = ort.SessionOptions()
    o.intra_op_num_threads = 2
    o.add_session_config_entry("session.disable_prepacking", "1")
    fwd = ort.InferenceSession(f"{d}/layer_fwd.onnx", o, providers=["CPUExecutionProvider"])
    vjp = ort.InferenceSession(f"{d}/layer_vjp.onnx", o, providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(f"{d}/head.onnx", o, providers=["CPUExecutionProvider"])
    names, trainable, L = meta["names"], meta["trainable"], meta["layers"]
    rng = np.random.default_rng(seed)
    V = w["embed"].shape[0]
    ids = rng.integers(0, min(20000, w["embed"].shape[0]), size=(B, T)); labels = ids.copy()
    D = meta["head_dim"]
    inv = 1.0 / (meta["rope_theta"] ** (np.arange(0, D, 2, dtype=np.float32) / D))
    pos = np.broadcast_to(np.arange(T)[None], (B, T)).astype(np.float32)
    emb = np.concatenate([pos[..., None] * inv, pos[..., None] * inv], -1)
    cos, sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
    mask = np.where(np.tril(np.ones((T, T), bool)), 0, np.finfo(np.float32).min).astype(np.float32)[None, None].repeat(B, 0)
    def lw(i): return {n: w[f"{i}/{n}"] for n in names}
    def step():
        h = w["embed"][ids].astype(np.float32)
        keep = [h]
        for i in range(L):
            h = fwd.run(None, {"h": h, "mask": mask, "cos": cos, "sin": sin, **lw(i)})[0]
            keep.append(h)
        total, count, gh = 0.0, 0, np.empty_like(h)
        for r in range(0, B, chunk):
            ls, c, g = head.run(None, {"h": h[r:r+chunk], "labels": labels[r:r+chunk], "norm": w["norm"], "embed": w.get("lm_head", w["embed"])})
            total, count = total + float(ls), count + int(c)
            gh[r:r + chunk] = g
        g = gh / count
        grads = {}
        for i in reversed(range(L)):
            out = vjp.run(None, {"h": keep[i], "mask": mask, "cos": cos, "sin": sin, "grad_out": g, **lw(i)})
            g = out[0]
            for n, x in zip(trainable, out[1:]):
                grads[f"{i}/{n}"] = x
        return total / count, grads
    times = []
    for k in range(3):
        started = time.perf_counter()
        loss, grads = step()
        times.append(time.perf_counter() - started)
    figures = ({"B": B, "T": T, "loss": round(loss, 4), "step_s": round(float(np.median(times[1:])), 2),
                      "tokens_per_s": round(B * T / float(np.median(times[1:])), 1), "peak_rss_mb": round(peak_rss_mb()),
                      "weights_mb": round(weights_mb), "peak_minus_weights_mb": round(peak_rss_mb() - weights_mb)})
    return figures, {"ids": ids, **grads}


def check(work: Path) -> dict:
    """Loss and LoRA gradients of the segmented step against PyTorch + PEFT on a tiny Llama (untied head)."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from edgeft.datasets import TINYSHAKESPEARE
    from edgeft.export.toy import tiny_llama

    folder = work / "tiny-llama"
    if not (folder / "config.json").is_file():
        tiny_llama(folder, TINYSHAKESPEARE.read_text()[:50_000], vocab_size=384)
    build(folder, work / "tiny-graphs")
    figures, grads = run(work / "tiny-graphs", 2, 16)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    base = model.base_model.model.model
    weights = dict(np.load(work / "tiny-graphs" / "weights.npz"))
    with torch.no_grad():
        for i, layer in enumerate(base.layers):
            for n, p in layer.named_parameters():
                p.copy_(torch.from_numpy(weights[f"{i}/{n}"]))
    assert (load_file(folder / "model.safetensors")["lm_head.weight"] == model.base_model.model.lm_head.weight.numpy()).all()
    ids = torch.from_numpy(grads.pop("ids"))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    worst = max(float(np.abs(grads[f"{i}/{n}"] - p.grad.numpy()).max() / (np.abs(p.grad.numpy()).max() + 1e-12))
                for i, layer in enumerate(base.layers) for n, p in layer.named_parameters() if p.requires_grad)
    return {"loss_segmented": figures["loss"], "loss_pytorch": round(float(out.loss), 4),
            "lora_gradients": len(grads), "worst_relative_gradient_difference": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/bench/llm/train-qwen2.5-0.5b-24-layers"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("runs/bench/segmented"))
    parser.add_argument("--check", action="store_true", help="parity with PyTorch + PEFT on a tiny Llama instead")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--column", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from common import emit

    if args.column:  # the measured step, in a process without torch
        from edgeft.train.session import keep_torch_out

        keep_torch_out()
        print(json.dumps(run(Path(args.column[0]), int(args.column[1]), int(args.column[2]))[0]))
        return
    if args.check:
        result = check(args.work)
        emit(result, f"segmented step vs PyTorch + PEFT (tiny Llama): loss {result['loss_segmented']} vs "
                     f"{result['loss_pytorch']}, LoRA gradients within {result['worst_relative_gradient_difference']:.1e}")
        return
    graphs = args.work / args.model.name
    if not (graphs / "meta.json").is_file():
        build(args.model, graphs)
    done = subprocess.run([sys.executable, __file__, "--column", str(graphs), str(args.batch), str(args.seq), "-"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the measured step failed: {done.stderr[-3000:]}")
    result = {"model": str(args.model), **json.loads(done.stdout.strip().splitlines()[-1])}
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    emit(result, f"segmented step ({args.batch} x {args.seq} tokens): peak RSS {result['peak_rss_mb']} MB of which "
                 f"{result['weights_mb']} MB fp32 weights; {result['tokens_per_s']} tokens/s")


if __name__ == "__main__":
    main()
