"""CUDA target check: numerics vs ONNX Runtime (CPU) and decode speed vs torch CUDA eager.

Two steps, because the GPU machine has no compiler toolchain for shiftc and a small upload limit:

    python benchmarks/cuda_check.py prepare --pack .devpack --arch sm_90   # here: compile for CUDA
    python benchmarks/cuda_check.py run --pack .devpack --json out.json     # on the GPU machine

``prepare`` compiles, for ``--target cuda``: an MLP, a small CNN, a tiny Llama-style decoder (random
weights) and a decoder of SmolLM2-135M's exact shapes whose weights are all zero (compute and memory
traffic of a dense model do not depend on the values, and a zero library compresses to a few MB
for the trip). ``run`` loads each library with the TVM runtime alone (no compiler), compares the
small models with ONNX Runtime on the CPU, and times SmolLM2-shaped prefill (128 tokens) and decode
(one token per step, KV cache, last-token logits copied to the host) against a Hugging Face
LlamaForCausalLM of the same config in torch CUDA eager, fp32 both.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
TINY_CONFIG = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
TOL_ABS = {"mlp": 1e-4, "cnn": 1e-4, "tiny_llama": 1e-3}


def prepare(pack: str, arch: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import shiftc
    from shiftc.frontend import metadata as md
    from shiftc.frontend.decoder_onnx import export_decoder
    from shiftc.frontend.onnx_io import save_model

    os.makedirs(pack, exist_ok=True)
    for name, factory in (("mlp", "tests.factories:mlp"), ("cnn", "tests.factories:small_cnn")):
        shiftc.export(factory, f"{pack}/{name}.onnx")
        shiftc.compile(f"{pack}/{name}.onnx", f"{pack}/{name}_cuda.so", target="cuda", arch=arch)
    torch.manual_seed(0)
    for name, cfg, zero in (("tiny_llama", TINY_CONFIG, False), ("smollm2_shape", SMOLLM2_CONFIG, True)):
        model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
        if zero:
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
        proto, spec = export_decoder(model, max_positions=cfg["max_position_embeddings"])
        md.set_info(proto, task="causal-lm", decoder=spec.to_json())
        onnx_path = f"{pack}/{name}.onnx"
        save_model(proto, onnx_path)
        lib = f"{pack}/{name}_cuda.so"
        shiftc.compile(onnx_path, lib, target="cuda", arch=arch)
        if zero:  # too big to travel as is: ship it compressed, drop the ONNX
            with open(lib, "rb") as src, lzma.open(lib + ".xz", "wb", preset=1) as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
            os.remove(lib)
            os.remove(onnx_path)
    with open(f"{pack}/configs.json", "w") as f:
        json.dump({"smollm2_shape": SMOLLM2_CONFIG, "tiny_llama": TINY_CONFIG}, f)
    print("prepared:", sorted(os.listdir(pack)))


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def run(pack: str, out_json: str) -> dict:
    import shiftc
    from shiftc.backend.runtime import load

    result = {"numerics": {}, "speed": {}}
    rng = np.random.default_rng(0)
    for name, shape in (("mlp", (4, 32)), ("cnn", (2, 3, 32, 32))):
        x = rng.standard_normal(shape).astype(np.float32)
        name_in = load(f"{pack}/{name}.onnx").inputs[0]["name"]
        ref = load(f"{pack}/{name}.onnx").run({name_in: x})
        got = load(f"{pack}/{name}_cuda.so").run({name_in: x})
        err = max(_max_err(got[k], ref[k]) for k in ref)
        result["numerics"][name] = {"max_abs_err": err, "tolerance": TOL_ABS[name], "ok": err <= TOL_ABS[name]}
    sc, sr = load(f"{pack}/tiny_llama_cuda.so").lm_session(), load(f"{pack}/tiny_llama.onnx").lm_session()
    prompt = rng.integers(0, TINY_CONFIG["vocab_size"], (1, 10))
    errs = [_max_err(sc.step(prompt), sr.step(prompt))]
    for t in (3, 99, 512):
        errs.append(_max_err(sc.step(np.array([[t]])), sr.step(np.array([[t]]))))
    result["numerics"]["tiny_llama"] = {"max_abs_err": max(errs), "tolerance": TOL_ABS["tiny_llama"], "ok": max(errs) <= TOL_ABS["tiny_llama"]}

    lib = f"{pack}/smollm2_shape_cuda.so"
    if not os.path.exists(lib):
        with lzma.open(lib + ".xz", "rb") as src, open(lib, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
    result["speed"]["shiftc_cuda"] = _time_shiftc(load(lib))
    result["speed"]["torch_cuda_eager"] = _time_torch()
    s, t = result["speed"]["shiftc_cuda"], result["speed"]["torch_cuda_eager"]
    result["speed"]["decode_ratio_vs_torch"] = s["decode_tokens_per_s"] / t["decode_tokens_per_s"]
    result["speed"]["prefill_ratio_vs_torch"] = s["prefill_tokens_per_s"] / t["prefill_tokens_per_s"]
    with open(out_json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return result


PREFILL, DECODE, REPEATS = 128, 64, 5


def _time_shiftc(model) -> dict:
    s = model.lm_session()
    prompt = np.random.default_rng(0).integers(0, 49152, (1, PREFILL))
    pre = []
    for _ in range(REPEATS + 1):
        s.reset()
        t0 = time.perf_counter()
        s.step(prompt, last_only=True)  # logits copied to the host: synchronises
        pre.append(time.perf_counter() - t0)
    dec = []
    for i in range(DECODE + 3):
        t0 = time.perf_counter()
        s.step(np.array([[i + 5]]), last_only=True)
        dec.append(time.perf_counter() - t0)
    return {"prefill_tokens_per_s": PREFILL / statistics.median(pre[1:]),
            "decode_tokens_per_s": 1 / statistics.median(dec[3:]), "decode_ms": 1e3 * statistics.median(dec[3:])}


def _time_torch() -> dict:
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_CONFIG)).cuda().eval()
    prompt = torch.randint(0, 49152, (1, PREFILL), device="cuda")
    pre = []
    with torch.no_grad():
        for _ in range(REPEATS + 1):
            t0 = time.perf_counter()
            cache = DynamicCache(config=model.config)
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
            out.logits[:, -1].float().cpu()
            pre.append(time.perf_counter() - t0)
        cache = out.past_key_values
        dec = []
        for i in range(DECODE + 3):
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([[i + 5]], device="cuda"), past_key_values=cache, use_cache=True)
            out.logits[:, -1].float().cpu()
            cache = out.past_key_values
            dec.append(time.perf_counter() - t0)
    return {"prefill_tokens_per_s": PREFILL / statistics.median(pre[1:]),
            "decode_tokens_per_s": 1 / statistics.median(dec[3:]), "decode_ms": 1e3 * statistics.median(dec[3:]),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--pack", default=".devpack")
    a.add_argument("--arch", default="sm_90")
    b = sub.add_parser("run")
    b.add_argument("--pack", default=".devpack")
    b.add_argument("--json", default="benchmarks/results/cuda.json")
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.pack, args.arch)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        res = run(args.pack, args.json)
        return 0 if all(v["ok"] for v in res["numerics"].values()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
