"""Seconds per image and peak GPU memory of each memory mode, on emulated 80, 48 and 24 GB cards.

For each mode (resident, FP8 storage, text-encoder offload, group offload + FP8 with and
without batched CFG or VAE tiling, model offload) and each card size, a fresh subprocess caps this GPU with
``torch.cuda.set_per_process_memory_fraction`` (card size / this GPU's size; the CUDA
context itself is not counted), loads the model with ``PipelineRunner`` exactly as a
server worker does, makes one warm-up image, then times one 1024x1024 image at each step
count (8 and 50 by default; true CFG 4.0, a job's defaults; each image with a prompt of its own, so that each
runs the text encoder) and records the peak allocated and reserved memory. A mode
that does not fit is reported as ``oom``. Results come as a markdown table and as JSON
lines (one per mode and card), with this GPU's name. Without CUDA it says so and exits 0.
Run from the repository root::

    python bench/memory_modes.py /models/Qwen-Image
    python bench/memory_modes.py random:Qwen/Qwen-Image --cards 48,24 --modes none,group+fp8 --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from serve_process import fresh_prompt, visible_gpu_name  # bench/, the folder of this script

#: Mode name -> run profile settings.
MODES = {
    "none": {},
    "fp8": {"weights_dtype": "fp8"},
    "text-encoder": {"offload": "text-encoder"},
    "group+fp8": {"offload": "group", "weights_dtype": "fp8"},
    # true CFG's two passes as one call: each step streams the transformer's blocks once instead of twice
    "group+fp8+cfgbatch": {"offload": "group", "weights_dtype": "fp8", "cfg_batch": "on"},
    # and the VAE in tiles: a tile's working memory instead of the image's (cards below 24 GB)
    "group+fp8+tiling": {"offload": "group", "weights_dtype": "fp8", "vae_tiling": "on"},
    "model": {"offload": "model"},
}
#: Emulated cards: GB on the label -> (an example card, MiB the driver reports for it).
CARDS = {80: ("H100 80GB", 81559), 48: ("L40S 48GB", 46068), 24: ("RTX 4090 24GB", 24564), 16: ("RTX 4080 16GB", 16376)}
PROMPT = "a lighthouse on a cliff at sunset, oil painting, highly detailed"
GIB = 1024**3


def run_one(model: str, mode: str, card: int, steps: list[int], size: int) -> dict:
    """In this process: cap the GPU to ``card``, load ``model`` in ``mode``, time one image per step count."""
    import torch

    from qwen_image_server.jobs import Job
    from qwen_image_server.models.profile import RunProfile
    from qwen_image_server.models.runner import PipelineRunner
    from qwen_image_server.models.spec import resolve_model

    total = torch.cuda.get_device_properties(0).total_memory
    label, mib = CARDS[card]
    fraction = min(1.0, mib * 1024**2 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    out: dict = {"gpu": torch.cuda.get_device_name(0), "mode": mode, "card": label, "memory_fraction": round(fraction, 4)}
    spec = replace(resolve_model(model), profile=RunProfile(**MODES[mode]))
    started = time.perf_counter()
    try:
        runner = PipelineRunner(spec, device="cuda:0", warm=False)  # load_s is the load alone; the warm-up is below
        out["load_s"] = round(time.perf_counter() - started, 1)
        out["after_load_gib"] = round(torch.cuda.memory_allocated(0) / GIB, 2)

        made = 0

        def image(num_steps: int) -> float:
            # A prompt of its own each time (``fresh_prompt``): a repeated one would leave out the text encoder's
            # pass, which under offload moves all its weights.
            nonlocal made
            prompt, made = fresh_prompt(PROMPT, made), made + 1
            job = Job(mode="generate", prompt=prompt, seeds=[0], width=size, height=size, num_inference_steps=num_steps)
            torch.cuda.synchronize()
            begin = time.perf_counter()
            runner.run(job)
            torch.cuda.synchronize()
            return time.perf_counter() - begin

        image(2)  # warm-up: kernels, group offload's first (order-recording) pass
        torch.cuda.reset_peak_memory_stats(0)
        for n in steps:
            out[f"s_{n}_steps"] = round(image(n), 2)
        stats = torch.cuda.memory_stats(0)
        out["peak_gib"] = round(stats["allocated_bytes.all.peak"] / GIB, 2)
        out["peak_reserved_gib"] = round(stats["reserved_bytes.all.peak"] / GIB, 2)
    except torch.OutOfMemoryError as exc:
        out["oom"] = str(exc).splitlines()[0][:200]
    return out


def table(rows: list[dict], steps: list[int]) -> str:
    """The results as a markdown table, one row per mode and card."""
    head = ["mode", "card", *[f"s/image ({n} steps)" for n in steps], "peak GiB", "peak reserved GiB", "load s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if "oom" in row or "error" in row:
            cells = [row["mode"], row["card"], *(["oom" if "oom" in row else "error"] * (len(head) - 2))]
        else:
            cells = [row["mode"], row["card"], *[str(row[f"s_{n}_steps"]) for n in steps], str(row["peak_gib"]),
                     str(row["peak_reserved_gib"]), str(row["load_s"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pairs(text: str) -> list[tuple[str, int]]:
    """``MODE@CARD,...`` → ``[(mode, card GB), ...]`` (a card that is not a number is reported as unknown)."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        mode, _, card = item.rpartition("@")
        out.append((mode, int(card) if card.isdigit() else -1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model folder, hub id or other model source string")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--cards", default="80,48,24", help="emulated card sizes in GB, from 80, 48, 24, 16")
    parser.add_argument(
        "--pairs", help="MODE@CARD,... to run instead of every mode on every card (e.g. none@80,fp8@48,group+fp8@24)"
    )
    parser.add_argument("--steps", default="8,50")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument(
        "--json", type=Path, help="also write the JSON lines to this file (emptied at start, each line added once measured)"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mode and card")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "CARD"), help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args(argv)
    steps = [int(n) for n in args.steps.split(",")]
    if args.one:
        print("RESULT " + json.dumps(run_one(args.model, args.one[0], int(args.one[1]), steps, args.size)), flush=True)
        return 0

    gpu = visible_gpu_name()
    if gpu is None:
        print("CUDA is not available: this benchmark measures GPU memory modes and needs a CUDA GPU; nothing was run.")
        return 0
    runs = pairs(args.pairs) if args.pairs else [(m, int(c)) for c in args.cards.split(",") for m in args.modes.split(",")]
    unknown = [m for m, _ in runs if m not in MODES] + [str(c) for _, c in runs if c not in CARDS]
    if unknown:
        parser.error(f"unknown modes or cards: {', '.join(dict.fromkeys(unknown))}")
    print(f"GPU: {gpu}; model {args.model}; {args.size}x{args.size}, steps {steps}", flush=True)
    if args.json:
        args.json.write_text("", encoding="utf-8")  # each row is added as it is measured: a run stopped midway keeps them
    rows = []
    for mode, card in runs:
        # one fresh process per run: the cap on the GPU's memory holds for one process
        cmd = [
            sys.executable,
            __file__,
            args.model,
            "--one",
            mode,
            str(card),
            "--steps",
            args.steps,
            "--size",
            str(args.size),
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=os.environ.copy())
            found = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(found[-1]) if found else {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        except subprocess.TimeoutExpired:
            row = {"error": f"timed out after {args.timeout:.0f}s"}
        row.setdefault("mode", mode)
        row.setdefault("card", CARDS[card][0])
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a", encoding="utf-8") as out:
                out.write(json.dumps(row) + "\n")
    print()
    print(table(rows, steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
