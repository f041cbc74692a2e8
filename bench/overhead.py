"""How much the server adds to a pipeline run: in-process vs. over HTTP, same model, same work.

Two ways to make the same image with a tiny text-to-image model (built once, offline):

- direct: ``PipelineRunner.run(Job)`` plus PNG encoding in this process, which is
  exactly what a server worker does;
- http: ``POST /v1/images/generations`` (``response_format=b64_json``) to
  ``qwen-image-server serve --workers 1`` in a subprocess, over one kept-alive
  connection, the PNG bytes taken out of the JSON response here.

Both use the same number of torch threads (``torch.set_num_threads`` here,
``QIS_CPU_THREADS`` for the server's worker). After warm-up runs on both sides the
two are alternated, strictly one after another (the server is idle between
requests, so it is idle while the direct run is timed), and the medians are
compared. Run from the repository root::

    python bench/overhead.py                      # 256x256, 4 steps, 10 runs each
    python bench/overhead.py --size 512x512 --steps 8 --runs 20
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import SERVED_LIMITS, not_negative, parse_size, positive, request_steps, served_size  # noqa: E402
from serve_process import ServeProcess, stop_on_sigterm  # noqa: E402

PROMPT = "a lighthouse on a cliff at sunset, oil painting"


class Server(ServeProcess):
    """``python -m qwen_image_server.cli serve`` with one worker, in a subprocess, and one kept-alive connection."""

    def __init__(self, model_dir: Path, threads: int, log_path: Path):
        options = ["--model", str(model_dir), "--workers", "1", "--device", "cpu", "--log-level", "warning"]
        env = {"QIS_CPU_THREADS": str(threads), "IMAGE_OUTPUT_DIR": str(log_path.parent / "images"), **SERVED_LIMITS}
        super().__init__(options, env, log_path)
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: dict | None = None, timeout: float = 600
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a kept-alive connection (as the openai SDK's HTTP client does): status, headers, body."""
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            try:
                self._conn.request(method, path, body=payload, headers=headers)
                response = self._conn.getresponse()
                return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                # The server closed the connection while it was idle (QIS_KEEP_ALIVE_TIMEOUT, 5 s: two
                # direct runs in a row at a large size take longer): open a new one, as HTTP clients do.
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
            except Exception:
                self._conn.close()
                self._conn = None
                raise
        raise AssertionError("unreachable")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=served_size, default="256x256", help="WIDTHxHEIGHT (default 256x256)")
    parser.add_argument(
        "--steps", type=request_steps, default=4, help="num_inference_steps (default 4; 2 to 1000, as the server takes)"
    )
    parser.add_argument("--runs", type=positive, default=10, help="timed runs on each side (default 10)")
    parser.add_argument("--warmup", type=not_negative, default=2, help="untimed runs on each side first (default 2)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--threads", type=positive, default=os.cpu_count() or 1, help="torch threads on both sides (default: all cores)"
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="tiny text-to-image model folder (built if missing)")
    parser.add_argument("--target", type=float, default=1.03, help="ratio the server should stay within (default 1.03)")
    args = parser.parse_args()
    stop_on_sigterm()
    width, height = parse_size(args.size)
    load_at_start = os.getloadavg()

    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from qwen_image_server.cli import ensure_tiny_model
    from qwen_image_server.config import Settings
    from qwen_image_server.images import encode_image
    from qwen_image_server.jobs import Job
    from qwen_image_server.models.runner import PipelineRunner
    from qwen_image_server.models.spec import resolve_model

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    from qwen_image_server.models import tiny

    version = getattr(tiny, "TINY_MODEL_VERSION", 1)  # a new folder whenever the tiny models change
    model_dir = args.model_dir or Path(tempfile.gettempdir()) / "qwen-image-server-bench" / f"tiny-text-to-image-v{version}"
    ensure_tiny_model(model_dir, "text-to-image")  # build_tiny_model into a staging folder, then renamed

    # The server fills these in from its settings; the direct job uses the same values.
    cfg = Settings().default_true_cfg_scale
    job = Job(
        mode="generate",
        prompt=PROMPT,
        negative_prompt=" ",
        seeds=[args.seed],
        width=width,
        height=height,
        num_inference_steps=args.steps,
        true_cfg_scale=cfg,
        output_format="png",
        output_compression=100,
    )
    body = {
        "prompt": PROMPT,
        "size": f"{width}x{height}",
        "num_inference_steps": args.steps,
        "seed": args.seed,
        "response_format": "b64_json",
        "output_format": "png",
        "prompt_rewrite": False,  # the same prompt on both sides, whatever the environment says
    }

    runner = PipelineRunner(resolve_model(str(model_dir)), device="cpu")

    def direct() -> tuple[float, float, bytes]:
        """Seconds in all, seconds of the pipeline run, the PNG."""
        started = time.perf_counter()
        image = runner.run(job)[0]
        ran = time.perf_counter() - started
        png = encode_image(image, job.output_format, job.output_compression)
        return time.perf_counter() - started, ran, png

    log_dir = Path(tempfile.mkdtemp(prefix="qis-bench-"))
    server = Server(model_dir, args.threads, log_dir / "server.log")
    try:
        server.wait_ready()

        def over_http() -> tuple[float, float, bytes]:
            """Seconds in all, seconds of the worker's pipeline run (X-Run-Start/End), the PNG."""
            started = time.perf_counter()
            status, headers, raw = server.request("POST", "/v1/images/generations", body)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {raw[:500]!r}")
            png = base64.b64decode(json.loads(raw)["data"][0]["b64_json"])  # the PNG bytes, as the direct side has them
            ran = float(headers["x-run-end"]) - float(headers["x-run-start"])
            return time.perf_counter() - started, ran, png

        for _ in range(args.warmup):
            direct()
            over_http()
        direct_s: list[float] = []
        http_s: list[float] = []
        # Time outside the pipeline run: encoding for direct; for http also the queue, pipes,
        # base64, JSON, HTTP and the client's decoding. Unlike the totals, it hardly varies
        # with the machine's load, so it shows the server's own cost even on a busy machine.
        direct_rest: list[float] = []
        http_rest: list[float] = []
        same = True
        for i in range(args.runs):
            # Alternate which goes first, so that drift in machine load hits both sides alike.
            order = (("direct", direct), ("http", over_http)) if i % 2 == 0 else (("http", over_http), ("direct", direct))
            pngs = {}
            for name, fn in order:
                seconds, ran, pngs[name] = fn()
                (direct_s if name == "direct" else http_s).append(seconds)
                (direct_rest if name == "direct" else http_rest).append(seconds - ran)
            same &= pngs["direct"] == pngs["http"]
            print(f"run {i + 1:2d}: direct {direct_s[-1] * 1000:8.1f} ms   http {http_s[-1] * 1000:8.1f} ms", flush=True)
    except BaseException:
        print(f"overhead.py: the server's log is kept in {log_dir}", file=sys.stderr)
        raise
    finally:
        server.stop()
    shutil.rmtree(log_dir, ignore_errors=True)  # a run that went through leaves nothing to look at

    d, h = statistics.median(direct_s), statistics.median(http_s)
    ratio = h / d
    # Other load only ever adds time: the ratio of the fastest runs and the median of the
    # ratios of neighbouring runs are less sensitive to it than the ratio of the medians.
    paired = statistics.median(hs / ds for hs, ds in zip(http_s, direct_s, strict=True))
    print()
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} torch threads on each side")
    print(
        f"load average (1 min) at start {load_at_start[0]:.2f}, at end {os.getloadavg()[0]:.2f} (> cores: other work disturbed the timings)"
    )
    print(f"model: tiny text-to-image ({model_dir}), true_cfg_scale {cfg}, seed {args.seed}")
    print(
        f"direct (PipelineRunner.run + PNG encode): median {d * 1000:.1f} ms  (min {min(direct_s) * 1000:.1f}, max {max(direct_s) * 1000:.1f})"
    )
    print(
        f"http   (POST /v1/images/generations):    median {h * 1000:.1f} ms  (min {min(http_s) * 1000:.1f}, max {max(http_s) * 1000:.1f})"
    )
    print(f"median difference: {(h - d) * 1000:+.1f} ms; identical PNG bytes on both sides: {'yes' if same else 'no'}")
    print(f"ratio of the fastest runs: {min(http_s) / min(direct_s):.3f}; median of paired ratios: {paired:.3f}")
    rest_d, rest_h = statistics.median(direct_rest), statistics.median(http_rest)
    run_d = statistics.median(t - r for t, r in zip(direct_s, direct_rest, strict=True))
    run_h = statistics.median(t - r for t, r in zip(http_s, http_rest, strict=True))
    print(f"pipeline run alone: direct median {run_d * 1000:.1f} ms, in the server's worker {run_h * 1000:.1f} ms")
    print(
        f"outside the pipeline run: direct {rest_d * 1000:.1f} ms (PNG encoding), http {rest_h * 1000:.1f} ms; "
        f"server overhead {(rest_h - rest_d) * 1000:.1f} ms = ratio {(d + rest_h - rest_d) / d:.3f} on the direct median"
    )
    print(f"overhead ratio (http/direct) at {width}x{height}, {args.steps} steps: {ratio:.3f} (target <= {args.target:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
