"""Local backend: throughput and where the time goes, and what score capture costs.

    python bench/local.py                  # images/s at batch 1 and 8, time split (tiny model)
    python bench/local.py --scores         # score capture: time and peak memory, batch 1/4/8
    python bench/local.py --model Qwen/Qwen2.5-VL-7B-Instruct --images 32        # on a GPU
    python bench/local.py --scores --model Qwen/Qwen2.5-VL-7B-Instruct           # on a GPU

With the tiny checkpoint the numbers measure grounding's own overhead and the transformers
path, not a real model. ``--scores`` uses a tiny checkpoint with Qwen's real vocabulary
(151,936 rows), generates exactly ``--max-new-tokens`` tokens per image (end-of-sequence
disabled) and runs each configuration in a fresh process, so the peak memory of one does
not hide another's: peak RSS on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU. It
compares no capture, the per-step recorder (what grounding does) and the full-logits
capture it replaced (``output_logits=True``, stacked and log-softmaxed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

QWEN_VOCAB = 151_936
MODES = ("none", "recorder", "full-logits")


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (480, 640), (800, 600), (1024, 768)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            for w, h in (sizes[i % len(sizes)] for i in range(n))]


def run(detector, imgs, batch: int) -> dict[str, float]:
    t0 = time.perf_counter()
    results = list(detector.detect_many(imgs, ["person", "car"], batch_size=batch))
    wall = time.perf_counter() - t0
    split = {k: sum(r.generation.timings[k] for r in results)
             for k in ("preprocess", "generate", "decode")}
    split["parse+rest"] = max(0.0, wall - sum(split.values()))
    return {"wall": wall, "images/s": len(imgs) / wall, **split}


def throughput(args: argparse.Namespace) -> None:
    from grounding.backends.local import LocalBackend
    from grounding.pipeline.detector import Detector

    backend = LocalBackend(args.model, max_new_tokens=args.max_new_tokens)
    detector = Detector(backend)
    imgs = images(args.images)
    args.batches = sorted({min(b, args.images) for b in args.batches})  # what really ran
    run(detector, imgs[:2], 2)  # warm-up
    rows = {b: run(detector, imgs, b) for b in args.batches}
    console = Console(width=120)
    console.print(f"model {backend.model} ({backend.dialect.name}) on {backend.device}, "
                  f"{args.images} images, max_new_tokens {args.max_new_tokens}, "
                  f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    table = Table(title="Local backend throughput")
    for col in ("batch", "images/s", "vs batch 1", "preprocess s", "generate s", "decode s",
                "parse+rest s", "wall s"):
        table.add_column(col, justify="right")
    base = rows[args.batches[0]]["images/s"]
    for b, r in rows.items():
        table.add_row(str(b), f"{r['images/s']:.2f}", f"{r['images/s'] / base:.2f}x",
                      f"{r['preprocess']:.2f}", f"{r['generate']:.2f}", f"{r['decode']:.2f}",
                      f"{r['parse+rest']:.2f}", f"{r['wall']:.2f}")
    console.print(table)


# -- score capture: one configuration per process ----------------------------------------

def _full_logits(backend, requests, limit: int) -> None:
    """The capture grounding used before: every step's logits kept, then log-softmaxed."""
    import torch

    frames = [backend.frame(r.image.size) for r in requests]
    inputs = backend.processor(
        text=[backend._chat(r) for r in requests], padding=True, return_tensors="pt",
        images=[r.image.resize(f, Image.Resampling.BICUBIC)
                for r, f in zip(requests, frames, strict=True)],
        do_resize=False).to(backend.device)
    with torch.inference_mode():
        out = backend.net.generate(**inputs, max_new_tokens=limit, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True,
                                   pad_token_id=backend.pad_id)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    logp = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1).cpu()
    logp.gather(-1, new.cpu().unsqueeze(-1))
    logp.topk(10, dim=-1)


def child(model: str, mode: str, batch: int, tokens: int, repeats: int) -> dict:
    import torch

    from grounding.backends import Request
    from grounding.backends.local import LocalBackend

    backend = LocalBackend(model, max_new_tokens=tokens, scores=mode == "recorder")
    backend.net.generation_config.eos_token_id = None  # every row runs to the limit
    backend.eos_ids = set()
    requests = [Request(im, "Outline every person and car.") for im in images(batch)]
    warm = [Request(images(1, seed=1)[0], "x", max_new_tokens=2)]
    backend.generate(warm)
    gpu = backend.placement.on_gpu
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(repeats):
        if mode == "full-logits":
            _full_logits(backend, requests, tokens)
        else:
            out = backend.generate(requests)
            assert all(len(g.text) >= 0 and not isinstance(g, Exception) for g in out), out
    if gpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / repeats
    peak = (torch.cuda.max_memory_allocated() if gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "batch": batch, "seconds": seconds, "peak": peak,
            "device": backend.device, "memory": "GPU allocated" if gpu else "RSS"}


def scores(args: argparse.Namespace) -> int:
    model = args.model
    if model is None:
        from grounding.testing import tiny_checkpoint

        model = str(tiny_checkpoint("qwen2.5-vl", vocab_size=QWEN_VOCAB))
    rows = []
    for batch in args.score_batches:
        trials: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.trials):  # modes interleaved, so drift hits each alike
            for mode in MODES:
                cmd = [sys.executable, __file__, "--child", json.dumps(
                    [model, mode, batch, args.max_new_tokens, args.repeats])]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return 1
                trials[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
        for runs in trials.values():  # noise only adds: the least of each is the cost
            rows.append({**runs[0], "seconds": min(r["seconds"] for r in runs),
                         "peak": min(r["peak"] for r in runs)})
    console = Console(width=120)
    first = rows[0]
    console.print(f"model {model} on {first['device']}, vocabulary {QWEN_VOCAB:,} rows, "
                  f"{args.max_new_tokens} new tokens per image, mean of {args.repeats} runs, "
                  f"least of {args.trials} processes, "
                  f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                  f"peak memory = {first['memory']}")
    table = Table(title="Score capture: cost against no capture")
    for col in ("batch", "capture", "s / batch", "time vs none", "ms / step vs none",
                "peak GiB", "peak vs none"):
        table.add_column(col, justify="right")
    failed = []
    for batch in args.score_batches:
        base = next(r for r in rows if r["batch"] == batch and r["mode"] == "none")
        for r in (r for r in rows if r["batch"] == batch):
            dt = r["seconds"] / base["seconds"] - 1
            dm = r["peak"] / base["peak"] - 1
            step = (r["seconds"] - base["seconds"]) / args.max_new_tokens * 1e3
            table.add_row(str(batch), r["mode"], f"{r['seconds']:.2f}", f"{dt:+.1%}",
                          f"{step:+.2f}", f"{r['peak'] / 2**30:.2f}", f"{dm:+.1%}")
            if r["mode"] == "recorder" and batch == max(args.score_batches) and (
                    dt > 0.10 or dm > 0.05):
                failed.append(f"batch {batch}: time {dt:+.1%}, peak {dm:+.1%}")
    console.print(table)
    console.print("target (recorder at the largest batch): at most +10% time, +5% peak: "
                  + ("met" if not failed else "MISSED " + "; ".join(failed)))
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hub id or directory (default: tiny)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default 64 for throughput, 256 for --scores")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--scores", action="store_true", help="measure score capture")
    parser.add_argument("--score-batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=3, help="runs per process")
    parser.add_argument("--trials", type=int, default=2, help="processes per configuration")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return 0
    if args.scores:
        args.max_new_tokens = args.max_new_tokens or 256
        return scores(args)
    args.max_new_tokens = args.max_new_tokens or 64
    if args.model is None:
        from grounding.testing import tiny_checkpoint

        args.model = str(tiny_checkpoint("qwen2.5-vl"))
    throughput(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
