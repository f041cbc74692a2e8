"""Two models on one GPU: a mixed stream of requests, per design, through the server.

For each design a server is started with a text-to-image model and an edit model on
the same GPU, then a stream of ``--requests`` requests alternating between the two
(generation, edit, generation...; ``--concurrency`` in flight; each with a prompt of its own) is sent:

- ``separate``: one worker process per model, each with its own text encoder and VAE;
- ``shared``: ``--share-components``: one process serves both, loading the identical
  text encoder and VAE once (the models take turns on the GPU);
- ``shared-int4``: the same with ``--quantize int4``, ``--offload text-encoder`` and
  ``--vae-tiling on``: both transformers resident in 4 bits (about 10.8 GiB each instead
  of 19 in FP8), the shared text encoder in FP8 (``--weights-dtype``) streamed per prompt,
  the VAE in tiles; the setting for a 48 GB card (an L40S has 45 GiB), so its ``fits`` is
  judged against 45 GiB (``DESIGN_CARDS``).

Both use ``--weights-dtype`` (default fp8: two bf16 transformers alone do not fit an
80 GB card), and allow images no larger than the stream's (``QIS_MAX_IMAGE_SIDE``, at
least 1024): the memory plan reserves working memory for the largest allowed image. Reported per design: seconds to ``/ready``, seconds for the whole stream,
statuses (an out-of-memory error is a 500), lost requests, p50/p99 latency, and the GPU
memory: ``peak_used_gib``, the most in use (by every process, CUDA contexts included) that
``nvidia-smi``, sampled every half second while the stream ran, reported (``GpuMemory``, as the
other benchmarks read it; a shorter spike can fall between two samples), and
``used_after_stream_gib``, what was in use once the stream had ended, read by a short-lived
probe process (its own CUDA context counted in; after an out-of-memory error the server has
emptied its cache, so this can be well below the peak). ``fits`` says whether the peak is
within ``--card-gib`` (80: an H100 80GB; ``DESIGN_CARDS`` may name a smaller one; on a larger card the figure tells whether it would
fit); without ``nvidia-smi`` it is judged by the figure after the stream (``fits_from``).
Each server's log is kept next to the ``--json`` file (``<its stem>-<design>.log``; without
``--json`` in a new temporary folder that is kept), and its path is in the record
(``server_log``). Results come as a markdown table and as JSON lines. Without CUDA it says
so and exits 0, unless ``--tiny`` asks for the tiny models on the CPU (a check of the
benchmark itself, no figures of interest). Run from the repository root::

    python bench/two_models.py                                   # random:Qwen/Qwen-Image + random:Qwen/Qwen-Image-Edit-2509
    python bench/two_models.py --designs shared --requests 40 --steps 50 --json two-models.jsonl
    python bench/two_models.py --tiny --requests 4               # on the CPU, tiny models
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import Requests, send, summary  # noqa: E402
from serve_process import (  # noqa: E402
    STOP_SECONDS,
    STOPPED_EXIT,
    GpuMemory,
    ServeProcess,
    Stopped,
    StopSignal,
    fresh_prompt,
    package_versions,
    tiny_model,
    visible_gpu_name,
)

DESIGNS = {
    "separate": [],
    "shared": ["--share-components"],
    "shared-int4": ["--share-components", "--quantize", "int4", "--offload", "text-encoder", "--vae-tiling", "on"],
}
#: The card a design is meant for, when smaller than ``--card-gib``: its ``fits`` is judged against that one.
DESIGN_CARDS = {"shared-int4": 45.0}
GIB = 1024**3


def gpu_use() -> list[dict]:
    """Per visible GPU: name, GiB in use (by every process) and total, asked of a short-lived subprocess."""
    from qwen_image_server.models.machine import discover_gpus

    return [
        {"device": g.device, "name": g.name, "used_gib": round((g.total - g.free) / GIB, 2), "total_gib": round(g.total / GIB, 2)}
        for g in discover_gpus() or []
        if g.total is not None and g.free is not None
    ]


def stream_kinds(count: int) -> list[str]:
    """The mixed stream: generations and edits taking turns, the worst case for models sharing a GPU."""
    return ["generation" if i % 2 == 0 else "edit" for i in range(count)]


async def run_stream(url: str, args, sent_prompts: set[str]) -> tuple[list[dict], float]:
    requests = Requests(args)
    rng = random.Random(args.seed)
    slots = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout) as client:

        async def one(index: int, kind: str) -> dict:
            request = requests.build(kind, rng)
            request["json"]["prompt"] = fresh_prompt(request["json"]["prompt"], index)  # a prompt of its own
            sent_prompts.add(request["json"]["prompt"])
            async with slots:
                return await send(client, kind, request)

        started = time.perf_counter()
        results = await asyncio.gather(*(one(index, kind) for index, kind in enumerate(stream_kinds(args.requests))))
        return list(results), time.perf_counter() - started


def run_design(design: str, models: tuple[str, str], args, tmp: Path, log: Path, stop: StopSignal | None = None) -> dict:
    """One design's server and stream; its record. Stopped by SIGTERM (``stop``, gpu-check.sh's budget) while the
    server loads or the stream runs, the record keeps what was measured (``stopped``) and the server is stopped."""
    stop = stop or StopSignal()
    options = ["--model", f"{args.model}={models[0]}", "--model", f"{args.edit_model}={models[1]}", *DESIGNS[design]]
    options += ["--queue-size", str(args.requests), "--log-level", "warning"]
    if args.weights_dtype != "auto":
        options += ["--weights-dtype", args.weights_dtype]
    if args.tiny:
        options += ["--device", "cpu"]
    # A model that fails to load is reported at once (no restarts with backoff: a full-size load takes minutes).
    env = {"QIS_MAX_STEPS": str(max(args.steps, 50)), "IMAGE_OUTPUT_DIR": str(tmp / design / "images"),
           "QIS_WORKER_RESTART_LIMIT": "0"}  # fmt: skip
    if args.tiny:
        env.update({"QIS_CPU_THREADS": "1", "QIS_MIN_IMAGE_SIDE": "64"})
    else:  # the memory plan sizes the working memory for the largest image the server allows: the stream's
        # generations and the edits of its square input (about one megapixel: 1024x1024)
        env["QIS_MAX_IMAGE_SIDE"] = str(max(1024, *(int(side) for side in args.size.lower().split("x"))))
    (tmp / design).mkdir(parents=True, exist_ok=True)
    record: dict = {"design": design, "models": list(models), "weights_dtype": args.weights_dtype, "requests": args.requests,
                    "concurrency": args.concurrency, "size": args.size, "steps": args.steps,
                    "card_gib": min(args.card_gib, DESIGN_CARDS.get(design, args.card_gib)),
                    "server_log": str(log)}  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    server = ServeProcess(options, env, log)
    started = time.perf_counter()
    try:
        try:
            with stop.waiting():
                server.wait_ready(timeout=args.ready_timeout)
        except Exception as exc:  # did not load: e.g. the plan does not fit, or out of memory while loading
            record.update(ready=False, error=str(exc)[:300])
            return record
        record["ready_s"] = round(time.perf_counter() - started, 1)
        prompts: set[str] = set()
        # the peak while the stream runs, every process on the GPU counted
        with GpuMemory() as memory, stop.waiting():
            results, seconds = asyncio.run(run_stream(server.url, args, prompts))
        record.update(ready=True, stream_s=round(seconds, 2), prompts=len(prompts), **summary(results))
        record["errors"] = sorted({r["code"] or str(r["status"]) for r in results if r["status"] != 200})
        ready = httpx.get(server.url + "/ready", timeout=30).json()
        pids = {w["pid"] for model in ready["models"].values() for w in model["workers"] if w.get("pid")}
        record["worker_processes"] = len(pids)  # shared: one process serves both models
        record["quantize"] = {  # what each model's workers really run (``--quantize``: its effective form)
            name: ((model["workers"] or [{}])[0].get("speed") or {}).get("quantize", {}).get("effective", "none")
            for name, model in ready["models"].items()
        }
        record["peak_used_gib"] = None if memory.peak_mib is None else round(memory.peak_mib / 1024, 2)
        # after the stream, from a probe process with a CUDA context of its own; an out-of-memory recovery during
        # the stream empties the server's cache, so this is no high-water mark
        record["gpus"] = gpu_use()
        after = max((g["used_gib"] for g in record["gpus"]), default=None)
        record["used_after_stream_gib"] = after
        peak = record["peak_used_gib"]
        judged, record["fits_from"] = (peak, "peak during the stream") if peak is not None else (after, "after the stream")
        record["fits"] = None if judged is None else judged <= record["card_gib"]
        if judged is None:
            record["fits_from"] = None
    except Stopped:
        record.update(ready=False, stopped=True, error="stopped by SIGTERM (the time budget ran out); figures so far kept")
    finally:
        server.stop(STOP_SECONDS if stop.asked else 60)
    return record


def table(records: list[dict]) -> str:
    lines = [
        "| design | processes | ready s | stream s | 200s | lost | errors | p50 ms | p99 ms | peak GPU GiB | fits card GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("stopped"):
            lines.append(f"| {r['design']} | | {r.get('ready_s', '')} (stopped by SIGTERM) | | | | | | | | |")
            continue
        if not r.get("ready"):
            lines.append(f"| {r['design']} | | not ready: {r.get('error', '')[:80]} | | | | | | | | |")
            continue
        ok = r["statuses"].get("200", 0)
        lines.append(
            f"| {r['design']} | {r['worker_processes']} | {r['ready_s']} | {r['stream_s']} | {ok}/{r['requests']} | {r['lost']} | "
            f"{', '.join(r['errors']) or '-'} | {r['p50_ms']} | {r['p99_ms']} | {r['peak_used_gib']} | {r['fits']} ({r['card_gib']:g}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t2i", default="random:Qwen/Qwen-Image", help="text-to-image model source")
    parser.add_argument("--edit", default="random:Qwen/Qwen-Image-Edit-2509", help="edit model source")
    parser.add_argument("--model", default="qwen-image", help="id of the text-to-image model")
    parser.add_argument("--edit-model", default="qwen-image-edit", help="id of the edit model")
    parser.add_argument("--designs", default="separate,shared", help=f"comma-separated, of {', '.join(DESIGNS)}")
    parser.add_argument("--weights-dtype", default="fp8", choices=["auto", "fp8"], help="for both models (default fp8)")
    parser.add_argument("--requests", type=int, default=20, help="requests in the stream (default 20)")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight at a time (default 2)")
    parser.add_argument("--size", default="1024x1024", help="size of the generations (default 1024x1024)")
    parser.add_argument("--steps", type=int, default=8, help="num_inference_steps (default 8)")
    parser.add_argument("--card-gib", type=float, default=80.0, help="the card the designs must fit (default 80)")
    parser.add_argument("--ready-timeout", type=float, default=1200, help="seconds a server may take to load")
    parser.add_argument("--request-timeout", type=float, default=1200, help="seconds per request before it counts as lost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="the tiny models on the CPU (checks the benchmark itself)")
    parser.add_argument("--json", type=Path, help="append one JSON line per design here")
    args = parser.parse_args(argv)
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown or not designs:
        parser.error(f"--designs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(DESIGNS)}")
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    if args.tiny:
        models = (str(tiny_model("text-to-image")), str(tiny_model("edit")))
        args.size, args.weights_dtype = "128x128" if args.size == "1024x1024" else args.size, "auto"
        args.steps = min(args.steps, 2)
        gpu = "cpu"
    else:
        visible = visible_gpu_name()
        if visible is None:
            print("CUDA is not available: this benchmark measures two models on one GPU and needs one; nothing was run.")
            return 0
        models, gpu = (args.t2i, args.edit), visible
    versions = {**package_versions(), "python": platform.python_version()}
    records = []
    # the servers' logs are kept, beside the --json file (a failed load's cause is in them); their images are not
    log_dir = args.json.parent if args.json else Path(tempfile.mkdtemp(prefix="qis-two-models-logs-"))
    stem = args.json.stem if args.json else "two-models"
    with StopSignal().installed() as stop, tempfile.TemporaryDirectory(prefix="qis-two-models-") as tmp:
        for design in designs:
            log = log_dir / f"{stem}-{design}.log"
            print(f"{design}: starting the server (log: {log})", flush=True)
            record = {**run_design(design, models, args, Path(tmp), log, stop), "gpu": gpu, "versions": versions}
            records.append(record)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            if stop.asked:  # the budget ran out: the designs not started are not run
                break
    print(f"\n{gpu}; {args.requests} requests alternating {args.model} / {args.edit_model}, {args.size}, {args.steps} steps, "
          f"{args.concurrency} in flight, weights {args.weights_dtype}\n")  # fmt: skip
    print(table(records))
    if stop.asked:
        return STOPPED_EXIT
    failed = [r for r in records if not r.get("ready") or r["lost"] or r["statuses"].get("200", 0) != r["requests"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
