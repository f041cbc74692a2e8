"""Seconds per image and peak GPU memory of each memory mode, on emulated 80, 48 and 24 GB cards.

For each mode (resident, FP8 storage, text-encoder offload, group offload + FP8 with and
without batched CFG or VAE tiling, model offload) and each card size, a fresh subprocess caps this GPU with
``torch.cuda.set_per_process_memory_fraction``, loads the model with ``PipelineRunner`` exactly as a
server worker does, makes one warm-up image, then times one 1024x1024 image at each step
count (8 and 50 by default; true CFG 4.0, a job's defaults; each image with a prompt of its own, so that each
runs the text encoder) and records the peak allocated and reserved memory. A mode
that does not fit is reported as ``oom``. Results come as a markdown table and as JSON
lines (one per mode and card), with this GPU's name, the versions of torch, diffusers and
transformers and the date (UTC). Without CUDA it says so and exits 0.

The cap holds only what torch's caching allocator holds: the CUDA context (driver state,
kernel images, about 0.5-1 GiB) lies outside it, and a real card of the emulated size holds
it too. So each subprocess first initialises CUDA and measures what the context takes
(``torch.cuda.mem_get_info``'s total minus free, minus what torch has reserved), then caps
the allocator at the card's size less that (``context_gib`` in the row). Kernel images that
CUDA loads lazily later (at their first launch) are not in that figure: the row's
``context_end_gib``, measured the same way after the timed images, shows how much the
context had grown, which the emulated card still holds beyond a real one.

Each row also has the load's figures: ``load_s``, ``after_load_gib`` (allocated once
loaded) and ``load_peak_gib`` / ``load_peak_reserved_gib`` (the peak while loading: under
FP8 storage the bf16 weights reach the GPU before their conversion, and that peak decides
whether a card can load the model at all); and per timed image the runner's counters
(``stats_<N>_steps``: transformer calls, prompt encodings).

Each pair's process sends its stderr (progress, tracebacks) straight to this one's, and
its figures on stdout as they are measured (a ``PARTIAL`` line at the start, after loading
and after each image, then a ``RESULT`` line), so a pair cut off midway still has a row.
Stopped with SIGTERM (``scripts/gpu-check.sh``'s time budget), the benchmark ends the
running pair's process (which writes its Python stack to stderr), records that pair as
``"status": "stopped"`` with the figures it had, and exits with 143; the rows measured
before it are already in ``--json``. Run from the repository root::

    python bench/memory_modes.py /models/Qwen-Image
    python bench/memory_modes.py random:Qwen/Qwen-Image --cards 48,24 --modes none,group+fp8 --json out.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace

from cli_args import at_least, writable_file
from serve_process import STOPPED_EXIT, fresh_prompt, package_versions, visible_gpu_name  # bench/, this script's folder

#: Mode name -> run profile settings.
MODES = {
    "none": {},
    "fp8": {"weights_dtype": "fp8"},
    "text-encoder": {"offload": "text-encoder"},
    "group+fp8": {"offload": "group", "weights_dtype": "fp8"},
    # true CFG's two passes as one call: each step streams the transformer's blocks once instead of twice
    "group+fp8+cfgbatch": {"offload": "group", "weights_dtype": "fp8", "cfg_batch": "on"},
    # and a step cache (fbcache) that skips every block after the first once the first step ran: its ceiling, since
    # random weights never fall under a real threshold. Under group offload a skipped block is not streamed either;
    # stats_N_steps counts the calls it served (cached_calls)
    "group+fp8+cfgbatch+cache": {"offload": "group", "weights_dtype": "fp8", "cfg_batch": "on", "cache": "fbcache:threshold=1"},
    # and the VAE in tiles: a tile's working memory instead of the image's (cards below 24 GB)
    "group+fp8+tiling": {"offload": "group", "weights_dtype": "fp8", "vae_tiling": "on"},
    # the transformer's blocks in 4 bits (resident: ~10.8 GiB), the text encoder in FP8 streamed once per prompt
    "int4+fp8+te": {"quantize": "int4", "weights_dtype": "fp8", "offload": "text-encoder"},
    # and the VAE in tiles (16 GB cards)
    "int4+fp8+te+tiling": {"quantize": "int4", "weights_dtype": "fp8", "offload": "text-encoder", "vae_tiling": "on"},
    "model": {"offload": "model"},
}
#: Emulated cards: GB on the label -> (an example card, MiB the driver reports for it).
CARDS = {80: ("H100 80GB", 81559), 48: ("L40S 48GB", 46068), 24: ("RTX 4090 24GB", 24564), 16: ("RTX 4080 16GB", 16376)}
PROMPT = "a lighthouse on a cliff at sunset, oil painting, highly detailed"
GIB = 1024**3
#: Seconds a pair's process gets to end after SIGTERM before SIGKILL, and to be reaped after that.
END_GRACE_S = 2.0
#: Seconds a pair's process killed for running too long gets to be reaped (and its GPU memory freed) before the next
#: pair starts: the next one measures its CUDA context as the memory in use that torch did not allocate.
REAP_AFTER_TIMEOUT_S = 60.0


def partial(out: dict) -> None:
    """The figures so far, on stdout for the parent: a pair cut off later still has them."""
    print("PARTIAL " + json.dumps(out), flush=True)


def context_bytes(torch, device: int = 0) -> int:
    """What this process holds on the GPU outside torch's caching allocator: its CUDA context, kernel images (and
    whatever other processes hold, none in a run of this benchmark)."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - torch.cuda.memory_reserved(device))


def run_one(model: str, mode: str, card: int, steps: list[int], size: int) -> dict:
    """In this process: cap the GPU to ``card`` (less the CUDA context), load ``model`` in ``mode``, time one image
    per step count. Prints a ``PARTIAL`` line at the start, once loaded and after each timed image."""
    import torch

    from qwen_image_server.errors import is_out_of_memory
    from qwen_image_server.jobs import Job
    from qwen_image_server.models.profile import RunProfile
    from qwen_image_server.models.runner import PipelineRunner
    from qwen_image_server.models.spec import resolve_model

    # CUDA's context exists once mem_get_info has run; measured before the cap, which holds only torch's allocations
    context = context_bytes(torch)
    total = torch.cuda.get_device_properties(0).total_memory
    label, mib = CARDS[card]
    fraction = min(1.0, max(mib * 1024**2 - context, 0) / total)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    out: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "mode": mode,
        "card": label,
        "memory_fraction": round(fraction, 4),
        "context_gib": round(context / GIB, 2),
    }
    partial(out)
    spec = replace(resolve_model(model), profile=RunProfile(**MODES[mode]))
    started = time.perf_counter()
    try:
        runner = PipelineRunner(spec, device="cuda:0", warm=False)  # load_s is the load alone; the warm-up is below
        out["load_s"] = round(time.perf_counter() - started, 1)
        out["after_load_gib"] = round(torch.cuda.memory_allocated(0) / GIB, 2)
        # the load's peak, before any reset: FP8 storage has the bf16 weights on the GPU before it converts them
        out["load_peak_gib"] = round(torch.cuda.max_memory_allocated(0) / GIB, 2)
        out["load_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(0) / GIB, 2)
        partial(out)

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
            out[f"stats_{n}_steps"] = dict(runner.last_stats)  # transformer calls, prompt encodings
            partial(out)
        stats = torch.cuda.memory_stats(0)
        out["peak_gib"] = round(stats["allocated_bytes.all.peak"] / GIB, 2)
        out["peak_reserved_gib"] = round(stats["reserved_bytes.all.peak"] / GIB, 2)
        out["context_end_gib"] = round(context_bytes(torch) / GIB, 2)
    except Exception as exc:  # torch's OutOfMemoryError, or a RuntimeError saying so (a pinned host allocation...)
        if not is_out_of_memory(exc):
            raise
        out["oom"] = str(exc).splitlines()[0][:200]
    return out


def child_command(args: argparse.Namespace, mode: str, card: int) -> list[str]:
    """The command of one pair's process."""
    return [sys.executable, __file__, args.model, "--one", mode, str(card), "--steps", args.steps, "--size", str(args.size)]


def end_process(child: subprocess.Popen) -> None:
    """SIGTERM (the pair's process then writes its Python stack to stderr), SIGKILL if it is still there."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=END_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
    # not reaped yet (e.g. a GPU's memory still being freed): it has SIGKILL, and this process goes on
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=END_GRACE_S)


def run_child(cmd: list[str], timeout: float, stopped: Callable[[], bool]) -> dict:
    """One pair's process: its stderr goes to this process's stderr, its stdout is copied to this stdout and its
    ``PARTIAL`` / ``RESULT`` lines merged, later over earlier, into the row. Ended when it runs past ``timeout`` or
    ``stopped()`` turns true; the row's ``status`` says how it ended (ok, oom, error, timeout, stopped)."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    lines: list[tuple[str, dict]] = []

    def read() -> None:
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tag, _, payload = line.partition(" ")
            if tag in ("PARTIAL", "RESULT"):
                with contextlib.suppress(ValueError):  # a line cut short
                    lines.append((tag, json.loads(payload)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    cut = None
    while child.poll() is None:
        if stopped():
            cut = "stopped"
        elif time.monotonic() > deadline:
            cut = "timeout"
        if cut:
            end_process(child)
            if cut == "timeout":  # the next pair starts next: the GPU's memory back first (its context is measured)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=REAP_AFTER_TIMEOUT_S)
            break
        time.sleep(0.1)
    reader.join(timeout=1 if cut or stopped() else 30)  # a grandchild may hold the pipe open after the pair ended
    row: dict = {}
    for _, figures in list(lines):
        row.update(figures)
    finished = any(tag == "RESULT" for tag, _ in lines)
    if cut is None and not finished and stopped():  # SIGTERM came to the whole process group: the pair ended first
        cut = "stopped"
    if cut == "stopped":
        row.update(status="stopped", error="stopped (SIGTERM) before the pair finished")
    elif cut == "timeout":
        row.update(status="timeout", error=f"timed out after {timeout:.0f}s")
    elif not finished:
        row.update(status="error", error=f"the pair's process exited with {child.returncode} without a result")
    else:
        row["status"] = "oom" if "oom" in row else "error" if "error" in row else "ok"
    return row


def table(rows: list[dict], steps: list[int]) -> str:
    """The results as a markdown table, one row per mode and card; a pair that did not finish shows how it ended."""
    head = ["mode", "card", *[f"s/image ({n} steps)" for n in steps], "peak GiB", "peak reserved GiB", "load s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        state = row.get("status") or ("oom" if "oom" in row else "error" if "error" in row else "ok")
        if state != "ok":
            cells = [row["mode"], row["card"], *([state] * (len(head) - 2))]
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


def _step_counts(text: str) -> list[int]:
    """``--steps``: comma-separated step counts, each at least 2."""
    return [at_least(2)(part.strip()) for part in text.split(",") if part.strip()] or [at_least(2)("")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model folder, hub id or other model source string")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--cards", default="80,48,24", help="emulated card sizes in GB, from 80, 48, 24, 16")
    parser.add_argument(
        "--pairs", help="MODE@CARD,... to run instead of every mode on every card (e.g. none@80,fp8@48,group+fp8@24)"
    )
    parser.add_argument("--steps", type=_step_counts, default="8,50", help="comma-separated step counts (default 8,50)")
    parser.add_argument("--size", type=at_least(256), default=1024)
    parser.add_argument(
        "--json",
        type=writable_file,
        help="also write the JSON lines to this file (emptied at start, each line added once measured)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mode and card")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "CARD"), help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args(argv)
    steps = args.steps
    # Checked before the GPU check: a wrong mode or card is said here too, not first on the GPU machine.
    try:
        runs = pairs(args.pairs) if args.pairs else [(m, int(c)) for c in args.cards.split(",") for m in args.modes.split(",")]
    except ValueError:
        parser.error(f"--cards takes whole numbers of GB, from {', '.join(map(str, CARDS))}: got {args.cards}")
    unknown = [m for m, _ in runs if m not in MODES] + [str(c) for _, c in runs if c not in CARDS]
    if unknown:
        parser.error(f"unknown modes or cards: {', '.join(dict.fromkeys(unknown))}")
    if args.one:
        if hasattr(faulthandler, "register"):  # stopped: where it was goes to stderr (the stage's log), then it ends
            faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
        try:
            result = run_one(args.model, args.one[0], int(args.one[1]), steps, args.size)
        except Exception as exc:  # the traceback to stderr, the error in the row (with the PARTIAL figures)
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    gpu = visible_gpu_name()
    if gpu is None:
        print("CUDA is not available: this benchmark measures GPU memory modes and needs a CUDA GPU; nothing was run.")
        return 0
    print(f"GPU: {gpu}; model {args.model}; {args.size}x{args.size}, steps {steps}", flush=True)
    if args.json:
        args.json.write_text("", encoding="utf-8")  # each row is added as it is measured: a run stopped midway keeps them
    rows: list[dict] = []
    # SIGTERM (gpu-check.sh's budget) ends the running pair; its row is written as stopped, with what it measured
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        for mode, card in runs:
            if received:
                break
            # one fresh process per run: the cap on the GPU's memory holds for one process
            measured = run_child(child_command(args, mode, card), args.timeout, lambda: bool(received))
            row = {"mode": mode, "card": CARDS[card][0], "gpu": gpu, **measured, "versions": package_versions()}
            row["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with args.json.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(row) + "\n")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:
        left = [f"{mode}@{card}" for mode, card in runs[len(rows) :]]
        print(f"stopped (SIGTERM); not run: {', '.join(left) or 'none'}", flush=True)
    print()
    print(table(rows, steps))
    return STOPPED_EXIT if received else 0


if __name__ == "__main__":
    sys.exit(main())
