"""ONNX Runtime and CTranslate2 as CPU decode peers, built from one save_pretrained folder.

The engines people pick for fast GPT-2 inference on a CPU; `gpt2-fast bench decode` (peers ort and
ct2) and bench/cpu_decode_peers.py (fp32 and int8, own processes, interleaved repetitions) run
them beside ours on the same weights. Optional: `pip install -e '.[peers]'`; without them the
callers report the peer as skipped with the reason.

  export_onnx(model_dir, path)   a GPT-2 decoder with past key values, exported with torch.onnx from
                                 the folder's weights: (input_ids (1, T), past_k, past_v (L, 1, H, P, D))
                                 -> (last-position logits (1, V), present_k, present_v (L, 1, H, P+T, D))
  quantize_onnx(src, dst)        onnxruntime.quantization.quantize_dynamic: int8 weights and
                                 activations (W8A8), ORT's own int8 recipe
  convert_ct2(model_dir, out, q) CTranslate2's transformers converter, quantization "float32" / "int8"
  ort_runner / ct2_runner        -> run(prompt, n): greedy, batch 1; returns (token ids, marks) with
                                 marks[0] before the prompt goes in and marks[i + 1] when token i is out
                                 (time to first token = marks[1] - marks[0]; decode steps between)
"""
from __future__ import annotations

import json
import os
import time

PEER_EXTRA = "pip install -e '.[peers]'"


def missing(module: str):
    """None when `module` imports, else the reason to print for a skipped peer."""
    try:
        __import__(module)
        return None
    except Exception as e:  # not installed, or broken against this numpy / torch
        return f"{module} is not importable ({type(e).__name__}: {str(e)[:120]}); {PEER_EXTRA}"


def export_onnx(model_dir: str, path: str) -> None:
    """Plain GPT-2 math from the folder's weights (HF names, Conv1D (in, out) layout), past as two
    stacked (L, B, H, P, D) inputs; opset 17, the TorchScript exporter (dynamo=False)."""
    import torch
    import torch.nn.functional as F

    from ..hf import read_hf_state_dict
    sd = {k.removeprefix("transformer."): v.float() for k, v in read_hf_state_dict(model_dir).items()}
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    L, H, C = cfg["n_layer"], cfg["n_head"], cfg["n_embd"]
    eps = cfg.get("layer_norm_epsilon", 1e-5)

    class KVDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.ParameterDict({k.replace(".", "__"): torch.nn.Parameter(v, requires_grad=False)
                                             for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))})

        def w(self, name):
            return self.p[name.replace(".", "__")]

        def forward(self, input_ids, past_k, past_v):
            T, P = input_ids.shape[1], past_k.shape[3]
            pos = torch.arange(T) + P
            x = self.w("wte.weight")[input_ids] + self.w("wpe.weight")[pos][None]
            keep = torch.arange(P + T)[None, :] <= pos[:, None]                  # (T, P + T) causal
            ks, vs = [], []
            for i in range(L):
                pre = f"h.{i}."
                h = F.layer_norm(x, (C,), self.w(pre + "ln_1.weight"), self.w(pre + "ln_1.bias"), eps)
                qkv = h @ self.w(pre + "attn.c_attn.weight") + self.w(pre + "attn.c_attn.bias")  # Conv1D
                q, k, v = (t.view(1, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=2))
                k = torch.cat([past_k[i], k], dim=2)
                v = torch.cat([past_v[i], v], dim=2)
                ks.append(k)
                vs.append(v)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
                a = a.transpose(1, 2).reshape(1, T, C)
                x = x + a @ self.w(pre + "attn.c_proj.weight") + self.w(pre + "attn.c_proj.bias")
                h = F.layer_norm(x, (C,), self.w(pre + "ln_2.weight"), self.w(pre + "ln_2.bias"), eps)
                h = F.gelu(h @ self.w(pre + "mlp.c_fc.weight") + self.w(pre + "mlp.c_fc.bias"), approximate="tanh")
                x = x + h @ self.w(pre + "mlp.c_proj.weight") + self.w(pre + "mlp.c_proj.bias")
            x = F.layer_norm(x[:, -1], (C,), self.w("ln_f.weight"), self.w("ln_f.bias"), eps)
            return x @ self.w("wte.weight").t(), torch.stack(ks), torch.stack(vs)

    m = KVDecoder().eval()
    D = C // H
    ex = (torch.zeros(1, 3, dtype=torch.long), torch.zeros(L, 1, H, 2, D), torch.zeros(L, 1, H, 2, D))
    axes = {"input_ids": {1: "T"}, "past_k": {3: "P"}, "past_v": {3: "P"}, "present_k": {3: "PT"},
            "present_v": {3: "PT"}}
    with torch.no_grad():
        torch.onnx.export(m, ex, path, input_names=["input_ids", "past_k", "past_v"],
                          output_names=["logits", "present_k", "present_v"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)


def quantize_onnx(src: str, dst: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8)


def convert_ct2(model_dir: str, out_dir: str, quantization: str) -> None:
    from ctranslate2.converters import TransformersConverter
    TransformersConverter(model_dir).convert(out_dir, quantization=quantization, force=True)


def ort_runner(onnx_path: str, threads: int, n_layer: int, n_head: int, n_embd: int):
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    empty = np.zeros((n_layer, 1, n_head, 0, n_embd // n_head), dtype=np.float32)

    def run(prompt: list[int], n: int):
        past_k = past_v = empty
        ids = np.array([prompt], dtype=np.int64)
        toks, marks = [], [time.perf_counter()]
        for _ in range(n):
            logits, past_k, past_v = sess.run(None, {"input_ids": ids, "past_k": past_k, "past_v": past_v})
            tok = int(logits[0].argmax())
            toks.append(tok)
            marks.append(time.perf_counter())
            ids = np.array([[tok]], dtype=np.int64)
        return toks, marks
    return run


def ct2_runner(ct2_dir: str, threads: int):
    import ctranslate2
    gen = ctranslate2.Generator(ct2_dir, device="cpu", intra_threads=threads, inter_threads=1)
    with open(os.path.join(ct2_dir, "vocabulary.json")) as f:
        vocab = json.load(f)

    def run(prompt: list[int], n: int):
        toks, marks = [], [time.perf_counter()]
        for step in gen.generate_tokens([vocab[t] for t in prompt], max_length=n, sampling_topk=1, end_token=[]):
            toks.append(step.token_id)
            marks.append(time.perf_counter())
            if len(toks) == n:
                break
        return toks, marks
    return run
