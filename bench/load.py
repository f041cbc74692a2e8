"""Load on the server: a burst far over its capacity, then a soak of mixed requests; nothing may be lost.

Two phases against one server (started here with the tiny models, or given with --url):

- burst: ``--burst-factor`` times the text-to-image model's capacity (workers + queue
  size) of generations sent at the same moment; the surplus must be refused with a
  JSON 503, the rest made;
- soak: ``--soak`` mixed requests with at most ``--concurrency`` in flight at a time:
  generations, JSON edits, multipart variations, streamed generations and invalid ones.

Reported: the share of 503s, lost requests (no response, a non-JSON response, or a
stream that ends without its completed or error event: must be 0), wrong answers (a
valid request answered otherwise than 200, 503 or 504; an invalid one otherwise than
400: must be 0), p50/p99 latency
of the successful ones, and the API process's RSS at the start and the end (psutil,
from --pid, or the server started here). Loopback only, bounded in count and in time
(--max-seconds: no new requests after it); it stops by itself. A server with API keys
needs one: --api-key, or the environment's QIS_BENCH_API_KEY.

Exit status: 0 when nothing was lost or answered wrongly, 1 when something was, 2 when
it could not run (a bad option, no server at --url, or --url's server refused the key).
Run from the repository root::

    python bench/load.py                              # tiny models, 1 worker, queue 4; burst 10x, soak 1000
    python bench/load.py --soak 100 --concurrency 8
    python bench/load.py --url http://127.0.0.1:8000 --pid 12345 --workers 2 --queue-size 32 --model qwen-image
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import ipaddress
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import SERVED_MIN_SIDE, request_steps, served_size, writable_file  # noqa: E402
from serve_process import ServeProcess, stop_on_sigterm, tiny_model  # noqa: E402

PROMPTS = ["a lighthouse at dusk", "a red bicycle", "ein Fuchs im Schnee", "猫と月", "a bowl of fruit, oil painting"]


def _png(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def server_options(args, folders: dict[str, Path], images: Path) -> tuple[list[str], dict[str, str]]:
    """The options and environment of the server started here: the tiny models in ``folders`` (by kind), the
    soak's steps as the most a request may ask for, yet never below the models' own default steps (their sidecar
    files': the server refuses to start with a default above its limit)."""
    from qwen_image_server.models.tiny import TINY_DEFAULT_STEPS

    max_steps = max(args.steps, TINY_DEFAULT_STEPS)
    env = {
        "QIS_CPU_THREADS": "1",
        "QIS_MAX_STEPS": str(max_steps),
        "QIS_MIN_IMAGE_SIDE": str(SERVED_MIN_SIDE),
        "IMAGE_OUTPUT_DIR": str(images),
    }
    options = [
        "--model", f"{args.model}={folders['text-to-image']}", "--model", f"{args.edit_model}={folders['edit']}",
        "--workers", str(args.workers), "--queue-size", str(args.queue_size), "--device", "cpu", "--log-level", "warning",
    ]  # fmt: skip
    return options, env


class Server(ServeProcess):
    """``qwen-image-server serve`` with the tiny text-to-image and edit models, in a subprocess."""

    def __init__(self, args, log_path: Path):
        folders = {kind: tiny_model(kind) for kind in ("text-to-image", "edit")}
        super().__init__(*server_options(args, folders, log_path.parent / "images"), log_path)


class Requests:
    """The requests of the soak: what to send for each kind."""

    def __init__(self, args):
        self.args = args
        self.image = base64.b64encode(_png(96, 1)).decode()
        self.png = _png(80, 2)

    def build(self, kind: str, rng: random.Random) -> dict:
        """httpx.request keyword arguments (method, url, body) for one request of ``kind``."""
        a = self.args
        common = {"prompt": rng.choice(PROMPTS), "num_inference_steps": a.steps, "seed": rng.randrange(2**31)}
        if kind == "generation":
            return {"method": "POST", "url": "/v1/images/generations", "json": {**common, "model": a.model, "size": a.size}}
        if kind == "stream":
            body = {**common, "model": a.model, "size": a.size, "stream": True, "partial_images": 1}
            return {"method": "POST", "url": "/v1/images/generations", "json": body}
        if kind == "edit":
            return {"method": "POST", "url": "/v1/images/edits", "json": {**common, "model": a.edit_model, "image": self.image}}
        if kind == "variation":
            data = {"model": a.model, "size": a.size, "num_inference_steps": str(a.steps), "strength": "0.5"}
            files = {"image": ("in.png", self.png, "image/png")}
            return {"method": "POST", "url": "/v1/images/variations", "data": data, "files": files}
        bad = rng.choice([
            {"json": {"prompt": "", "model": a.model}},
            {"json": {**common, "size": "17x17"}},
            {"json": {**common, "n": -3}},
            {"content": b'{"prompt": "unterminated', "headers": {"content-type": "application/json"}},
            {"json": {**common, "model": "no-such-model"}},
        ])  # fmt: skip
        return {"method": "POST", "url": "/v1/images/generations", **bad}


def mix(count: int, rng: random.Random) -> list[str]:
    """The soak's request kinds in a random order: 40% generations, 20% edits, 15% variations, 10% streams, 15% invalid."""
    weights = {"generation": 40, "edit": 20, "variation": 15, "stream": 10, "invalid": 15}
    return rng.choices(list(weights), weights=list(weights.values()), k=count)


async def send(client: httpx.AsyncClient, kind: str, kwargs: dict) -> dict:
    """One request: its status, latency and whether it was lost (no answer, or not the answer's format)."""
    started = time.perf_counter()
    try:
        if kind == "stream":
            async with client.stream(**kwargs) as response:
                content = await response.aread()
        else:
            response = await client.request(**kwargs)
            content = response.content
    except httpx.HTTPError as exc:
        return {"kind": kind, "status": None, "seconds": time.perf_counter() - started, "lost": f"{type(exc).__name__}: {exc}"}
    seconds = time.perf_counter() - started
    lost = code = None
    ctype = response.headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        if b"event: image_generation.completed" not in content and b"event: error" not in content:
            lost = "stream ended without a completed or error event"
    else:
        try:
            body = json.loads(content)
            if response.status_code != 200:
                error = body.get("error")
                code = error.get("code") if isinstance(error, dict) else None
                lost = None if isinstance(error, dict) else "error without the error envelope"
        except (ValueError, AttributeError):
            lost = f"non-JSON response ({response.status_code}, {ctype or 'no content type'})"
    return {"kind": kind, "status": response.status_code, "seconds": seconds, "lost": lost, "code": code}


async def burst(client: httpx.AsyncClient, requests: Requests, count: int, rng: random.Random) -> list[dict]:
    """``count`` generations at once."""
    return list(await asyncio.gather(*(send(client, "generation", requests.build("generation", rng)) for _ in range(count))))


async def soak(client: httpx.AsyncClient, requests: Requests, kinds: list[str], concurrency: int, deadline: float, rng) -> list:
    """The mixed requests, at most ``concurrency`` at a time; none is started after ``deadline``."""
    slots = asyncio.Semaphore(concurrency)

    async def one(kind: str) -> dict | None:
        async with slots:
            if time.monotonic() > deadline:
                return None
            return await send(client, kind, requests.build(kind, rng))

    return [r for r in await asyncio.gather(*(one(kind) for kind in kinds)) if r is not None]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


#: The answers a request of each kind may get: a valid request is served (200), refused while the server is full
#: (503) or past its task timeout (504); an invalid one gets a 400. Anything else is a wrong answer (a valid request
#: the server refused as invalid: e.g. a --size outside a --url server's side limits).
EXPECTED = {"invalid": {400}}
EXPECTED_VALID = {200, 503, 504}


def wrong(result: dict) -> bool:
    """Whether a request that was answered got an answer its kind may not get (``EXPECTED``); a lost one (a
    non-JSON 500, a stream cut short) is counted as lost only, not twice."""
    if result["status"] is None or result["lost"]:
        return False
    return result["status"] not in EXPECTED.get(result["kind"], EXPECTED_VALID)


def summary(results: list[dict]) -> dict:
    """Counts by status, the 503 share, lost requests, wrong answers and the successful ones' latency percentiles
    (ms)."""
    ok = [r["seconds"] for r in results if r["status"] == 200 and not r["lost"]]
    statuses: dict[str, int] = {}
    codes: dict[str, int] = {}  # of the errors: queue_full, invalid_value...
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        if r.get("code"):
            codes[r["code"]] = codes.get(r["code"], 0) + 1
    p50, p99 = percentile(ok, 0.5), percentile(ok, 0.99)
    return {
        "requests": len(results),
        "statuses": dict(sorted(statuses.items())),
        "error_codes": dict(sorted(codes.items())),
        "share_503": round(statuses.get("503", 0) / len(results), 4) if results else 0.0,
        "lost": sum(1 for r in results if r["lost"]),
        "lost_examples": sorted({r["lost"] for r in results if r["lost"]})[:5],
        "wrong": sum(1 for r in results if wrong(r)),
        "wrong_examples": sorted({f"{r['kind']}: {r['status']} {r.get('code')}" for r in results if wrong(r)})[:5],
        "p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
        "p99_ms": round(p99 * 1000, 1) if p99 is not None else None,
    }


def rss_mib(pid: int | None) -> float | None:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1) if pid else None


def _loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def run(args, url: str, pid: int | None) -> dict:
    rng = random.Random(args.seed)
    requests = Requests(args)
    capacity = args.workers + args.queue_size
    deadline = time.monotonic() + args.max_seconds
    connections = max(args.concurrency, args.burst_factor * capacity)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=args.concurrency)
    report: dict = {"url": url, "capacity": capacity, "rss_mib_start": rss_mib(pid)}
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits, headers=headers) as client:
        burst_results = await burst(client, requests, args.burst_factor * capacity, rng)
        report["burst"] = summary(burst_results)
        report["rss_mib_after_burst"] = rss_mib(pid)
        soak_results = await soak(client, requests, mix(args.soak, rng), args.concurrency, deadline, rng)
        report["soak"] = summary(soak_results)
        kinds = sorted({r["kind"] for r in soak_results})
        report["soak_by_kind"] = {kind: summary([r for r in soak_results if r["kind"] == kind])["statuses"] for kind in kinds}
        report["soak_not_sent"] = args.soak - len(soak_results)  # left when --max-seconds passed
        alive = await client.get("/health")
        report["health_after"] = alive.status_code
    report["rss_mib_end"] = rss_mib(pid)
    return report


def argument_parser() -> argparse.ArgumentParser:
    """load.py's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (loopback only); default: start one with the tiny models")
    parser.add_argument("--pid", type=int, help="the API process of --url, for its RSS")
    parser.add_argument("--model", default="qwen-image-tiny", help="text-to-image model id (default qwen-image-tiny)")
    parser.add_argument("--edit-model", default="qwen-image-edit-tiny", help="edit model id (default qwen-image-edit-tiny)")
    parser.add_argument("--workers", type=int, default=1, help="workers per model (of the server started here, or of --url's)")
    parser.add_argument("--queue-size", type=int, default=4, help="queue size per model (likewise)")
    parser.add_argument("--burst-factor", type=int, default=10, help="burst size, in times the capacity (workers + queue size)")
    parser.add_argument("--soak", type=int, default=1000, help="mixed requests in the soak (default 1000)")
    parser.add_argument("--concurrency", type=int, default=8, help="soak requests in flight at a time (default 8)")
    parser.add_argument(
        "--size",
        type=served_size,
        help="size of generations and variations (default 128x128 on the server started here, whose smallest side is "
        "16; 256x256 with --url, a server's default smallest side)",
    )
    parser.add_argument("--steps", type=request_steps, default=2, help="num_inference_steps (default 2)")
    parser.add_argument("--max-seconds", type=float, default=600, help="no new soak request after this many seconds")
    parser.add_argument("--request-timeout", type=float, default=300, help="seconds per request before it counts as lost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=writable_file, help="also write the report here")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("QIS_BENCH_API_KEY") or None,
        help="an API key of --url's server, sent as a bearer token (default: the environment's QIS_BENCH_API_KEY)",
    )
    return parser


def key_refusal(url: str, api_key: str | None) -> str | None:
    """Why --url's server would refuse every request of this run for its key (a 401 from /v1/models), or None."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=10)
    if response.status_code != 401:
        return None
    if not api_key:
        return f"the server at {url} needs an API key: give it with --api-key or QIS_BENCH_API_KEY"
    return f"the server at {url} refused the API key given"


def main() -> int:
    parser = argument_parser()
    args = parser.parse_args()
    stop_on_sigterm()
    if args.burst_factor < 1 or args.soak < 0 or args.concurrency < 1 or args.workers < 1 or args.queue_size < 1:
        parser.error("--burst-factor, --concurrency, --workers and --queue-size must be at least 1, --soak at least 0")
    if args.url and not args.url.startswith(("http://", "https://")):
        parser.error(f"--url must be a URL such as http://127.0.0.1:8000, got {args.url}")
    if args.url and not _loopback(args.url):
        parser.error(f"--url must be a loopback address (127.0.0.1, ::1 or localhost), got {args.url}")
    args.size = args.size or ("256x256" if args.url else "128x128")
    if args.url:
        if args.pid is not None and not psutil.pid_exists(args.pid):
            parser.error(f"--pid {args.pid}: no such process")
        try:
            httpx.get(args.url.rstrip("/") + "/health", timeout=10)
        except httpx.HTTPError as exc:
            print(f"load.py: no server answers at {args.url} ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
        if refusal := key_refusal(args.url, args.api_key):
            print(f"load.py: {refusal}", file=sys.stderr)
            return 2
    server = None
    with tempfile.TemporaryDirectory(prefix="qis-load-") as tmp:
        try:
            if args.url:
                url, pid = args.url.rstrip("/"), args.pid
            else:
                server = Server(args, Path(tmp) / "server.log")
                server.wait_ready(timeout=300)
                url, pid = server.url, server.process.pid
            report = asyncio.run(run(args, url, pid))
        finally:
            if server is not None:
                server.stop()
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(report, ensure_ascii=False) + "\n")
    failed = sum(report[phase]["lost"] + report[phase]["wrong"] for phase in ("burst", "soak"))
    return 1 if failed or report["health_after"] != 200 else 0


if __name__ == "__main__":
    sys.exit(main())
