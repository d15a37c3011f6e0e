"""Where a training step's time goes: the same GPT step in a bare PyTorch loop and under Lightning.

    python benchmarks/lm_step_profile.py --out benchmarks/results/lm_step_profile_h100.json
"""

from __future__ import annotations

import argparse
import json
import string
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from mmgen.tasks import LanguageModel
from mmgen_text import CharTokenizer


def make_model() -> LanguageModel:
    tok = CharTokenizer()
    tok.fit(["\n" + string.printable[:64]])
    return LanguageModel({"text": tok})


def bare_loop(steps: int, batch: int, block: int, compile: str | None) -> float:
    model = make_model().cuda()
    net = model.net
    if compile:
        net.compile(mode=compile)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True)
    x = torch.randint(4, 69, (batch, block), device="cuda")
    y = torch.randint(4, 69, (batch, block), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = net(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(20):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


class Timer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.n = warmup, None, 0

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, *args) -> None:
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.n = trainer.global_step - self.warmup


class Synthetic(torch.utils.data.IterableDataset):
    def __init__(self, batch: int, block: int, n: int) -> None:
        self.batch, self.block, self.n = batch, block, n

    def __iter__(self):
        for _ in range(self.n):
            yield torch.randint(4, 69, (self.batch, self.block)), torch.randint(4, 69, (self.batch, self.block))


def lightning_loop(steps: int, batch: int, block: int, mode: str) -> float:
    model = make_model()
    model.hparams.compile = True
    model.hparams.compile_mode = mode
    model.hparams.sample_tokens = 0
    timer = Timer(20)
    trainer = L.Trainer(accelerator="cuda", devices=1, precision="bf16-mixed", max_steps=steps + 20,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], limit_val_batches=0)
    loader = torch.utils.data.DataLoader(Synthetic(batch, block, steps + 20), batch_size=None, num_workers=2,
                                         pin_memory=True)
    trainer.fit(model, train_dataloaders=loader)
    return timer.seconds / timer.n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--modes", nargs="+", default=["default", "reduce-overhead"])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    batch, block = 64, 256
    result = {"device": torch.cuda.get_device_name(), "batch": batch, "block": block}
    result["bare_eager_ms"] = 1000 * bare_loop(a.steps, batch, block, compile=None)
    for mode in a.modes:
        result[f"bare_compiled_{mode}_ms"] = 1000 * bare_loop(a.steps, batch, block, compile=mode)
        result[f"lightning_compiled_{mode}_ms"] = 1000 * lightning_loop(a.steps, batch, block, mode)
    for k in [k for k in result if k.endswith("_ms")]:
        result[k.replace("_ms", "_tokens_per_s")] = batch * block / result[k] * 1000
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
