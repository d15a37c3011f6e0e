"""Decoding speed of a GPT at batch 1: tokens/s with and without the KV cache (same weights, same sampling).

    python benchmarks/lm_decode.py --out benchmarks/results/lm_decode_h100.json [--ckpt PATH]

Without ``--ckpt`` the model is the shakespeare_char architecture (6 layers, 6 heads, width 384, block 256, 65
characters) with random weights: speed does not depend on the weights. If HF ``transformers`` is installed, a
``GPT2LMHeadModel`` of the same shape decodes the same number of tokens with its own cache in the same run, as a peer.
"""

from __future__ import annotations

import argparse
import json
import platform
import string
import time
from pathlib import Path

import torch

import mmgen
from mmgen.tasks import LanguageModel
from mmgen_text import CharTokenizer


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def hf_peer(model: LanguageModel, tokens: int, device: str, repeats: int) -> dict | None:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    hp = model.hparams
    cfg = GPT2Config(vocab_size=model.text.spec.vocab_size, n_positions=hp.block_size, n_embd=hp.d_model,
                     n_layer=hp.num_layers, n_head=hp.num_heads, attn_implementation="sdpa")
    peer = GPT2LMHeadModel(cfg).to(device).eval()
    prompt = torch.ones(1, 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        seconds = timed(lambda: peer.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True,
                                              top_k=0, use_cache=True, pad_token_id=0), device, repeats)
    import transformers

    return {"name": f"transformers {transformers.__version__} GPT2LMHeadModel.generate (sdpa, cache)",
            "tokens_per_s": tokens / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--tokens", type=int, default=255, help="new tokens; at most block_size - 1 so the HF peer fits")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.manual_seed(0)
    if a.ckpt:
        model = mmgen.load(a.ckpt, device=a.device)
    else:
        tok = CharTokenizer()
        tok.fit(["\n" + string.printable[:64]])  # 65 characters, as Tiny Shakespeare has
        model = LanguageModel({"text": tok}, dropout=0.0).to(a.device).eval()
    prompt = "\n"
    result = {"benchmark": "lm_decode", "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
              "host": platform.node(), "batch": 1, "new_tokens": a.tokens, "ckpt": a.ckpt,
              "params": sum(p.numel() for p in model.parameters())}
    for use_cache in (True, False):
        seconds = timed(lambda: model.generate(prompt, a.tokens, temperature=1.0, seed=0, use_cache=use_cache),
                        a.device, a.repeats)
        result["kv_cache" if use_cache else "no_cache"] = {"seconds": seconds, "tokens_per_s": a.tokens / seconds}
    result["cache_speedup"] = result["kv_cache"]["tokens_per_s"] / result["no_cache"]["tokens_per_s"]
    peer = hf_peer(model, a.tokens, a.device, a.repeats)
    if peer:
        peer["ratio_mmgen_over_peer"] = result["kv_cache"]["tokens_per_s"] / peer["tokens_per_s"]
        result["peer"] = peer
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
