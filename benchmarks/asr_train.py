"""Train a speech recipe on FSDD splits for several seeds, test each best checkpoint once, report WER and CER.

    python benchmarks/asr_train.py --config recipes/speech/fsdd_ctc_attention.yaml --seeds 1 2 3 \
        --splits standard speaker:george speaker:jackson speaker:lucas speaker:nicolas speaker:theo connected \
        --parallel 7 --out benchmarks/results/fsdd_asr.json

Each (split, seed) job is its own process (``mmgen fit`` then ``mmgen test --ckpt_path <best>`` in it, so the test
part is read once, at the end, by the last checkpoint unless ``--test-ckpt best``); ``--parallel`` runs that many side by side (on one GPU, or splitting the CPU cores).
A split is ``standard``, ``speaker:NAME`` (NAME held out for test) or ``connected`` (connected digit sequences);
``--split-args SPLIT=ARGS`` adds CLI overrides for one split, e.g. ``connected="--trainer.max_steps 3000"``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path


def split_overrides(split: str) -> list[str]:
    if split == "standard":
        return ["--data.split", "standard"]
    if split.startswith("speaker:"):
        return ["--data.split", "speaker", "--data.test_speaker", split.split(":", 1)[1]]
    if split == "connected":
        return ["--data.split", "standard", "--data.connected", "true"]
    raise SystemExit(f"unknown split {split!r}; accepted: standard, speaker:NAME, connected")


def run_job(job: dict) -> dict:
    """In a child process: fit, then test the best checkpoint; return the numbers."""
    import torch

    from mmgen.config import cli_main

    torch.set_num_threads(job["threads"])
    args = ["--config", job["config"], "--seed_everything", str(job["seed"]), "--data.seed", str(job["seed"]),
            *split_overrides(job["split"]), *job["extra"]]
    start = time.time()
    fit = cli_main(["fit", *args, "--trainer.default_root_dir", job["root"]])
    fit_s = time.time() - start
    monitored = fit.trainer.checkpoint_callback  # the first ModelCheckpoint: the recipe's best-by-validation one
    last = next(c.last_model_path for c in fit.trainer.checkpoint_callbacks if c.last_model_path)
    ckpt = monitored.best_model_path if job["test_ckpt"] == "best" else last
    dm = fit.datamodule
    test = cli_main(["test", *args, "--trainer.default_root_dir", job["root"] + "/test", "--ckpt_path", ckpt])
    metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items() if k.startswith("test_")}
    import mmgen

    model = mmgen.load(ckpt, device="cuda" if torch.cuda.is_available() else "cpu")
    batches = list(test.datamodule.test_dataloader())  # read once, decoded every way below
    metrics.update(every_decoding(model, test.datamodule, batches))
    if job["split"].startswith("speaker:") and job["warp_grid"]:
        metrics["warp_adaptation"] = warp_adaptation(model, batches, job["warp_grid"])
    if job["split"].startswith("speaker:") and job["entropy"]:
        metrics["entropy_adaptation"] = entropy_adaptation(model, batches, ENTROPY_GRID)
    score = monitored.best_model_score
    return {"split": job["split"], "seed": job["seed"], **metrics, "tested": job["test_ckpt"],
            "best_val": None if score is None else float(score), "best_path": Path(monitored.best_model_path).name,
            "monitor": monitored.monitor, "steps": fit.trainer.global_step,
            "fit_s": round(fit_s, 1), "total_s": round(time.time() - start, 1),
            "ctc_infeasible": {k: len(v) for k, v in dm.ctc_infeasible.items()},
            "train_utterances": len(dm._datasets["train"]), "test_utterances": len(test.datamodule._datasets["test"])}


def every_decoding(model, dm, batches: list[dict]) -> dict:
    """Test WER of each decoding on the same test batches, and the most frequent word errors of the recipe's.
    ``attention``/``joint`` use the checkpoint's lexicon setting, ``_lexicon`` holds them to the words of the training
    transcripts, ``_free`` lets them spell freely."""
    from collections import Counter

    from torchmetrics.functional.text import word_error_rate

    own_lexicon = model.hparams.lexicon
    words = dm.training_words()
    # name -> (search, lexicon); names whose setting equals another's share its transcripts (decoded once).
    settings = {d: (d, own_lexicon) for d in ("ctc_greedy", "ctc_beam", "attention", "joint")}
    for search in ("attention", "joint"):
        settings[f"{search}_lexicon"], settings[f"{search}_free"] = (search, words), (search, None)
    def key(search: str, lexicon: list[str] | None) -> tuple:
        return search, tuple(lexicon) if lexicon else None

    unique = {key(*setting): setting for setting in settings.values()}
    found: dict[tuple, list[str]] = {key: [] for key in unique}
    refs: list[str] = []
    for batch in batches:
        refs += batch["text"]
        for k, (search, lexicon) in unique.items():
            model.hparams.lexicon = lexicon
            found[k] += model.recognize(batch["source"], search)
    model.hparams.lexicon = own_lexicon
    decodings = tuple(settings)
    hyps = {d: found[key(*setting)] for d, setting in settings.items()}

    def frequent(d: str) -> list[str]:
        errors = Counter((r, h) for r, h in zip(refs, hyps[d]) if r != h)
        return [f"{r} -> {h} ({n})" for (r, h), n in errors.most_common(8)]

    return {"test_wer_by_decoding": {d: float(word_error_rate(hyps[d], refs)) for d in decodings},
            "frequent_errors": frequent(model.hparams.decoding), "frequent_errors_joint_lexicon": frequent("joint_lexicon")}


WARP_GRID = [round(0.8 + 0.025 * i, 3) for i in range(17)]  # 0.800, 0.825, ..., 1.200


def warp_adaptation(model, batches: list[dict], grid: list[float]) -> dict:
    """Test-time vocal-tract-length normalisation, measured on a held-out speaker: every test utterance is decoded
    (the recipe's decoding) with its log-mel frequency axis warped by each factor of ``grid``, and the model's
    own confidence picks a factor without looking at the transcripts. Confidence is the mean over an utterance's
    real encoder frames of the CTC head's largest log-probability. ``speaker``: one factor for all of the speaker's
    files (the highest mean confidence); ``utterance``: each file its own. ``by_factor`` gives the WER at every
    factor (``oracle``: the best of them, which does look at the transcripts)."""
    import torch
    from mmgen_audio import FrequencyWarp
    from torchmetrics.functional.text import word_error_rate

    from mmgen.tasks.common import evaluating

    src = model.source
    warp = FrequencyWarp(src.n_mels, src.f_min, src.f_max or src.sample_rate / 2, 0.0).to(model.device)
    refs: list[str] = []
    hyps: dict[float, list[str]] = {a: [] for a in grid}
    conf: dict[float, list[float]] = {a: [] for a in grid}
    start = time.time()
    for batch in batches:
        refs += batch["text"]
        values, mask = batch["source"].values.to(model.device), batch["source"].mask.to(model.device)
        for a in grid:  # alpha inner: every factor reuses the batch's captured search
            warped = warp(values, a) if a != 1.0 else values
            with torch.inference_mode(), evaluating(model.net):  # one encoder pass: confidence, then decoding
                memory, enc_mask, log_probs = model._encode_for_decoding(warped, mask)
                best = log_probs.max(dim=-1).values * enc_mask
                conf[a] += (best.sum(dim=1) / enc_mask.sum(dim=1)).tolist()
                ids = model._decode(memory, enc_mask, log_probs, model.hparams.decoding, model.hparams.beam_size)
            hyps[a] += [model.target.decode(row) for row in ids]
    by_factor = {a: float(word_error_rate(hyps[a], refs)) for a in grid}
    mean_conf = {a: sum(c) / len(c) for a, c in conf.items()}
    speaker = max(grid, key=lambda a: mean_conf[a])
    per_utt = [max(grid, key=lambda a: conf[a][i]) for i in range(len(refs))]
    utt_hyps = [hyps[a][i] for i, a in enumerate(per_utt)]
    return {"unwarped_wer": by_factor.get(1.0), "speaker_factor": speaker, "speaker_wer": by_factor[speaker],
            "utterance_wer": float(word_error_rate(utt_hyps, refs)),
            "utterance_factors_mean": sum(per_utt) / len(per_utt),
            "oracle_factor": min(grid, key=lambda a: by_factor[a]), "oracle_wer": min(by_factor.values()),
            "by_factor": by_factor, "confidence_by_factor": mean_conf, "seconds": round(time.time() - start, 1)}


ENTROPY_GRID = [(lr, epochs) for lr in (1e-3, 3e-3, 1e-2) for epochs in (1, 3)]


def entropy_adaptation(model, batches: list[dict], grid: list[tuple[float, int]]) -> dict:
    """Test-time entropy minimisation (TENT, Wang et al. 2021; SUTA, Lin et al. 2022, for CTC), measured on a
    held-out speaker: the encoder's LayerNorm scales and shifts alone are trained, without transcripts, to lower the
    entropy of the CTC head's distributions on the frames whose most likely label is not blank, over the speaker's
    test batches (AdamW at ``lr`` for ``epochs`` passes, eval mode), then every test utterance is decoded (the
    recipe's decoding). Each setting starts again from the trained weights, which are restored at the end."""
    import torch
    from torch import nn
    from torchmetrics.functional.text import word_error_rate

    from mmgen.modality import Batch

    norms = [m for m in model.net.encoder.modules() if isinstance(m, nn.LayerNorm)]
    params = [p for m in norms for p in m.parameters()]
    saved = [p.detach().clone() for p in params]
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    batches = [(b["source"].values.to(model.device), b["source"].mask.to(model.device), b["text"]) for b in batches]
    refs = [t for _, _, text in batches for t in text]
    out = {}
    start = time.time()
    try:
        for lr, epochs in grid:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            model.net.eval()
            losses = []
            for _ in range(epochs):
                for values, mask, _ in batches:
                    memory, enc_mask = model.net.encode(values, mask)
                    log_probs = model.net.ctc_head(memory).float().log_softmax(dim=-1)
                    keep = enc_mask & (log_probs.argmax(dim=-1) != model.blank_id)
                    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
                    loss = (entropy * keep).sum() / keep.sum().clamp_min(1)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(float(loss))
            hyps = [h for values, mask, _ in batches for h in model.recognize(Batch(values, mask))]
            out[f"lr={lr:g},epochs={epochs}"] = {"wer": float(word_error_rate(hyps, refs)),
                                                "entropy_first": losses[0], "entropy_last": losses[-1]}
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    return {"by_setting": out, "seconds": round(time.time() - start, 1)}


def launch(job: dict) -> dict:
    out = Path(job["root"]) / "result.json"
    log = Path(job["root"]) / "log.txt"
    Path(job["root"]).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job), "--out", str(out)], stdout=f,
                              stderr=subprocess.STDOUT, env=env)
    if job["logs"]:  # kept: the job's own folder is temporary
        Path(job["logs"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(log, Path(job["logs"]) / f"{job['split'].replace(':', '_')}_{job['seed']}.txt")
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"job {job['split']} seed {job['seed']} failed:\n{tail}")
    result = json.loads(out.read_text())
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="recipes/speech/fsdd_ctc_attention.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--splits", nargs="+", default=["standard"])
    p.add_argument("--split-args", nargs="*", default=[], help="SPLIT=ARGS: extra overrides for one split")
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--threads", type=int, help="CPU threads per job; default the cores divided by --parallel")
    p.add_argument("--test-ckpt", choices=["last", "best"], default="last",
                   help="test the last checkpoint (default) or the best by the recipe's validation metric")
    p.add_argument("--warp-grid", type=float, nargs="*", default=WARP_GRID,
                   help="warp factors of the test-time adaptation measured on held-out speakers (none: skip it)")
    p.add_argument("--entropy-adaptation", action="store_true",
                   help="also measure test-time entropy minimisation on held-out speakers (ENTROPY_GRID)")
    p.add_argument("--logs", help="a folder to keep each job's log in")
    p.add_argument("--out", required=True)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="further CLI overrides for every job (after --)")
    a = p.parse_args()
    if a.job:
        Path(a.out).write_text(json.dumps(run_job(json.loads(a.job))))
        return
    per_split = dict(item.split("=", 1) for item in a.split_args)
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.parallel)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [{"config": a.config, "split": s, "seed": seed, "threads": threads, "test_ckpt": a.test_ckpt,
                 "warp_grid": a.warp_grid, "entropy": a.entropy_adaptation, "logs": a.logs,
                 "extra": [*a.extra, *shlex.split(per_split.get(s, ""))],
                 "root": f"{tmp}/{s.replace(':', '_')}_{seed}"} for s in a.splits for seed in a.seeds]
        start = time.time()
        runs = []
        with ThreadPoolExecutor(a.parallel) as pool:
            for future in as_completed([pool.submit(launch, job) for job in jobs]):
                runs.append(future.result())
                partial = Path(a.out).with_suffix(".partial.json")  # what is done so far, should the rest not finish
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps(runs, indent=2))
        wall = time.time() - start
        runs.sort(key=lambda r: (a.splits.index(r["split"]), r["seed"]))
    summary = {}
    for s in a.splits:
        rows = [r for r in runs if r["split"] == s]
        summary[s] = {"mean_test_wer": statistics.mean(r["test_wer"] for r in rows),
                      "mean_test_cer": statistics.mean(r["test_cer"] for r in rows),
                      "test_wer": [r["test_wer"] for r in rows], "seeds": [r["seed"] for r in rows]}
    speakers = [s for s in a.splits if s.startswith("speaker:")]
    if speakers:
        summary["held_out_speaker_mean_wer"] = statistics.mean(summary[s]["mean_test_wer"] for s in speakers)
        adapted = [r for r in runs if "warp_adaptation" in r]
        for way in ("unwarped", "speaker", "utterance", "oracle"):
            if adapted and (way != "unwarped" or 1.0 in a.warp_grid):  # mean over speakers of the mean over seeds
                per = [statistics.mean(r["warp_adaptation"][f"{way}_wer"] for r in adapted if r["split"] == s)
                       for s in speakers]
                summary[f"held_out_speaker_mean_wer_warp_{way}"] = statistics.mean(per)
    result = {"benchmark": "asr_train", "config": a.config, "overrides": a.extra, "split_args": per_split,
              "seeds": a.seeds, "parallel": a.parallel, "host": platform.node(), "device": _device(),
              "wall_s": round(wall, 1), "summary": summary, "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
