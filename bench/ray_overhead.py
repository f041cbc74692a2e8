"""Ray Serve against the embedded engine: the same requests through both, in one run.

- embedded: ``qwen-image-server serve --workers 1`` in a subprocess;
- ray: the same app on Ray Serve in this process (``ray.init``, one model replica,
  ``num_gpus=0``), reached through Ray's HTTP proxy.

Both get the same torch thread count, the same tiny text-to-image model and the
same requests, alternated one after another (each side idle while the other is
timed), and the medians are compared. Run from the repository root with the
``ray`` extra installed::

    python bench/ray_overhead.py                    # 256x256, 4 steps, 10 runs each
    python bench/ray_overhead.py --runs 20 --size 512x512
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import SERVED_MAX_STEPS, SERVED_MIN_SIDE, not_negative, parse_size, positive, request_steps, served_size  # noqa: E402
from overhead import PROMPT, Server  # noqa: E402
from serve_process import free_port, stop_on_sigterm  # noqa: E402


def post(port: int, body: dict) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request(
            "POST", "/v1/images/generations", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        raw = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {raw[:300]!r}")
        return raw
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=served_size, default="256x256", help="WIDTHxHEIGHT (default 256x256)")
    parser.add_argument("--steps", type=request_steps, default=4, help="num_inference_steps (default 4)")
    parser.add_argument("--runs", type=positive, default=10, help="timed runs on each side (default 10)")
    parser.add_argument("--warmup", type=not_negative, default=2, help="untimed runs on each side first (default 2)")
    parser.add_argument("--seed", type=not_negative, default=1234)
    parser.add_argument("--threads", type=positive, default=os.cpu_count() or 1, help="torch threads on each side")
    parser.add_argument("--target", type=float, default=1.05, help="ratio the Ray path should stay within (default 1.05)")
    args = parser.parse_args()
    stop_on_sigterm()
    width, height = parse_size(args.size)

    import ray
    from PIL import Image
    from ray import serve

    from qwen_image_server.cli import ensure_tiny_model
    from qwen_image_server.config import Settings
    from qwen_image_server.models.configured import resolve_configured
    from qwen_image_server.models.tiny import TINY_MODEL_VERSION
    from qwen_image_server.ray_app import build_application

    model_dir = Path(tempfile.gettempdir()) / "qwen-image-server-bench" / f"tiny-text-to-image-v{TINY_MODEL_VERSION}"
    ensure_tiny_model(model_dir, "text-to-image")
    body = {
        "prompt": PROMPT,
        "size": f"{width}x{height}",
        "num_inference_steps": args.steps,
        "seed": args.seed,
        "prompt_rewrite": False,
    }

    log_dir = Path(tempfile.mkdtemp(prefix="qis-ray-bench-"))
    os.environ["IMAGE_OUTPUT_DIR"] = str(log_dir / "images")
    embedded = Server(model_dir, args.threads, log_dir / "server.log")
    try:  # the embedded server is stopped whatever fails from here on, Ray's start included
        ray.init(num_cpus=os.cpu_count(), num_gpus=0, include_dashboard=False, log_to_driver=False)
        ray_port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": ray_port})
        settings = Settings(
            models=[f"tiny={model_dir}"], engine="ray", workers=1, cpu_threads=args.threads,
            ray_gpus_per_replica=0, ray_cpus_per_replica=0.5, min_image_side=SERVED_MIN_SIDE, max_steps=SERVED_MAX_STEPS,
        )  # fmt: skip
        serve.run(build_application(settings, resolve_configured(settings)), name=settings.ray_app_name, route_prefix="/")
        embedded.wait_ready()

        def timed(port: int) -> tuple[float, bytes]:
            started = time.perf_counter()
            png = base64.b64decode(json.loads(post(port, body))["data"][0]["b64_json"])
            Image.open(io.BytesIO(png)).load()
            return time.perf_counter() - started, png

        sides = {"embedded": embedded.port, "ray": ray_port}
        for _ in range(args.warmup):
            for port in sides.values():
                timed(port)
        times: dict[str, list[float]] = {name: [] for name in sides}
        same = True
        for i in range(args.runs):
            order = list(sides.items()) if i % 2 == 0 else list(reversed(sides.items()))
            pngs = {}
            for name, port in order:
                seconds, pngs[name] = timed(port)
                times[name].append(seconds)
            same &= pngs["embedded"] == pngs["ray"]
            print(
                f"run {i + 1:2d}: embedded {times['embedded'][-1] * 1000:8.1f} ms   ray {times['ray'][-1] * 1000:8.1f} ms",
                flush=True,
            )
    except BaseException:
        print(f"ray_overhead.py: the embedded server's log and the images are kept in {log_dir}", file=sys.stderr)
        raise
    finally:
        embedded.stop()
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    shutil.rmtree(log_dir, ignore_errors=True)  # a run that went through leaves nothing to look at

    e, r = statistics.median(times["embedded"]), statistics.median(times["ray"])
    print()
    print(f"machine: {os.cpu_count()} CPU cores, {args.threads} torch threads on each side")
    print(f"embedded: median {e * 1000:.1f} ms (min {min(times['embedded']) * 1000:.1f})")
    print(f"ray:      median {r * 1000:.1f} ms (min {min(times['ray']) * 1000:.1f})")
    print(f"identical PNG bytes on both sides: {'yes' if same else 'no'}")
    print(f"overhead ratio (ray/embedded) at {width}x{height}, {args.steps} steps: {r / e:.3f} (target <= {args.target:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
