"""The full-size benchmark: the whole served path at 1024x1024 with the real Qwen-Image architectures.

For each speed setting this starts ``python -m qwen_image_server.cli serve`` with
``--model qwen-image=random:Qwen/Qwen-Image`` (``random:Qwen/Qwen-Image-Edit`` for the
edit setting; random weights, the real shapes) plus the setting's flags, waits for
``/ready`` and times HTTP requests end to end: the first request after ``/ready``,
then ``--runs`` warm ones (median), each with a prompt of its own (``take``): the
server keeps the embeddings of prompts it has seen, and a prompt sent again would
skip the text encoder. A setting whose server exits with code 2 (a
flag this server does not take) is recorded as ``unsupported`` with the server's
error line. Each setting appends one JSON line to the results file; a markdown
table with the targets follows. Run from the repository root::

    python bench/gpu.py                                   # every setting, 3 warm requests each
    python bench/gpu.py --settings eager,lightning-compile --runs 5
    python bench/gpu.py --list                            # the settings and what they run
    python bench/gpu.py --smoke                           # CPU: a reduced architecture, to check this script

Without a visible GPU (and without ``--smoke``) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import image_size, parse_size, positive  # noqa: E402
from serve_process import (  # noqa: E402
    STOP_SECONDS,
    STOPPED_EXIT,
    GpuMemory,
    ModelsFailed,
    ServeProcess,
    ServerExited,
    Stopped,
    StopSignal,
    fresh_prompt,
    package_versions,
    read_stream,
    visible_gpu_name,
)

from qwen_image_server.models.random_source import SMALL_OVERRIDES  # noqa: E402

PROMPT = "a lighthouse on a cliff at sunset, oil painting, dramatic clouds"
OTHER_PROMPT = "a bowl of ramen on a wooden table, steam rising, soft window light, shallow depth of field, 35mm photo"


def take(index: int) -> str:
    """``PROMPT`` made new for the ``index``-th request to a server (``fresh_prompt``)."""
    return fresh_prompt(PROMPT, index)


CFG = {"num_inference_steps": 50, "true_cfg_scale": 4.0}
LIGHTNING = {"num_inference_steps": 8, "true_cfg_scale": 1.0}
FIRST_OVER_WARM = 1.1
E2E_OVER_PIPELINE = 1.02


@dataclass(frozen=True)
class Setting:
    """One way to run the server, and the requests timed against it."""

    name: str
    args: tuple[str, ...] = ()  # extra ``serve`` flags
    fields: dict = field(default_factory=dict, hash=False)  # request fields
    edit: bool = False
    sizes: tuple[str, ...] = ()  # () = the bench's size; more: each is timed first and warm
    new_prompt: bool = False  # also time one request with a prompt of another length
    target_s: float | None = None  # the target for the warm median, seconds


FAST = ("--compile", "--quantize", "fp8", "--cfg-batch", "on")
SETTINGS = (
    Setting("eager", (), CFG),
    Setting("compile", ("--compile",), CFG),
    Setting("fp8", ("--quantize", "fp8"), CFG),
    # 4-bit weights unpacked to bf16 for each matmul: what the unpacking costs against eager, and compiled
    Setting("int4", ("--quantize", "int4"), CFG),
    Setting("compile-int4-cfgbatch", ("--compile", "--quantize", "int4", "--cfg-batch", "on"), CFG),
    Setting("cfg-batch", ("--cfg-batch", "on"), CFG),
    Setting("fbcache", ("--cache", "fbcache"), CFG),
    Setting("compile-fp8-cfgbatch", FAST, CFG, target_s=8.0),
    Setting("compile-fp8-cfgbatch-cache", (*FAST, "--cache", "fbcache"), CFG, target_s=4.0),
    Setting("lightning-eager", (), LIGHTNING),
    Setting("lightning-compile", ("--compile",), LIGHTNING, target_s=0.8),
    Setting("lightning-compile-fp8", ("--compile", "--quantize", "fp8"), LIGHTNING, target_s=0.8),
    # What previews cost: three VAE decodes of the current estimate during the 8 steps (against lightning-eager)
    Setting("lightning-stream", (), {**LIGHTNING, "stream": True, "partial_images": 3}),
    Setting(
        "first-vs-warm",
        ("--compile", "--compile-sizes", "1024x1024,1328x1328"),
        LIGHTNING,
        sizes=("1024x1024", "1328x1328"),
        new_prompt=True,
    ),
    Setting("edit", (), CFG, edit=True),
)
SMOKE_STEPS = {"num_inference_steps": 2, "true_cfg_scale": 4.0}
SMOKE_SETTINGS = (
    Setting("smoke", (), SMOKE_STEPS, new_prompt=True),
    Setting("smoke-unsupported", ("--quantize", "int3"), SMOKE_STEPS),
    Setting("smoke-edit", (), SMOKE_STEPS, edit=True),
    Setting("smoke-stream", (), {**SMOKE_STEPS, "stream": True, "partial_images": 1}),
)


class Server(ServeProcess):
    """The server under test, with a client that waits as long as a full-size run takes."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        super().__init__(args, env, log_path)
        self.client = httpx.Client(base_url=self.base_url, timeout=3600)

    def stop(self, timeout: float = 60) -> None:
        self.client.close()
        super().stop(timeout)


def picture_b64(size: str) -> str:
    """A PNG of ``size`` (smooth colours and some noise) as base64, the edit's input image."""
    import numpy as np
    from PIL import Image

    width, height = parse_size(size)
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 32, (height, width))
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y + noise) % 256], axis=-1).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Bench:
    """Runs the settings against servers of one kind (full size on a GPU, or the CPU smoke run)."""

    def __init__(self, args: argparse.Namespace, log_dir: Path):
        self.args = args
        self.stop = StopSignal()  # SIGTERM's handler (``main`` installs it)
        self.log_dir = log_dir
        if args.smoke:
            self.t2i = f"random:Qwen/Qwen-Image?{SMALL_OVERRIDES}&default_size={args.size}"
            self.edit = f"random:Qwen/Qwen-Image-Edit?{SMALL_OVERRIDES}&edit_area=65536&condition_area=3136"
            self.common, self.env = ["--device", "cpu", "--log-level", "warning"], {"QIS_CPU_THREADS": "1"}
        else:
            self.t2i, self.edit = "random:Qwen/Qwen-Image", "random:Qwen/Qwen-Image-Edit"
            self.common, self.env = ["--log-level", "warning"], {}
        self.picture = picture_b64(args.size)

    def request(self, server: Server, setting: Setting, size: str, prompt: str, seed: int) -> tuple[float, dict]:
        body = {"model": "qwen-image-edit" if setting.edit else "qwen-image", "prompt": prompt, "size": size, "seed": seed}
        body.update(response_format="b64_json", **setting.fields)
        path = "/v1/images/edits" if setting.edit else "/v1/images/generations"
        if setting.edit:
            body["image"] = self.picture
        started = time.perf_counter()
        if body.get("stream"):
            with server.client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"{path} answered {response.status_code}: {response.read()[:300]!r}")
                streamed = read_stream(response.iter_lines())
            return time.perf_counter() - started, streamed
        response = server.client.post(path, json=body)
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:300]}")
        return seconds, response.json()

    def run(self, setting: Setting) -> dict:
        """Time one setting; the record of ``results.jsonl``."""
        model = f"qwen-image-edit={self.edit}" if setting.edit else f"qwen-image={self.t2i}"
        server_args = [*self.common, "--model", model, *setting.args]
        record: dict = {"setting": setting.name, "server_args": server_args, "request": setting.fields, "size": self.args.size}
        record.update(status="ok", error=None)
        # A model that fails to load is reported at once (no restarts with backoff: a full-size load or compile takes
        # minutes each time) and recorded, instead of waited for until --start-timeout.
        env = {"IMAGE_OUTPUT_DIR": str(self.log_dir / "images"), "QIS_WORKER_RESTART_LIMIT": "0", **self.env}
        server: Server | None = None
        stop_seconds = 60.0
        memory = GpuMemory()
        try:
            record.update(self.environment())
            record["gpu_memory_before_gib"] = _gib(GpuMemory.used_mib())
            server = Server(server_args, env, self.log_dir / f"{setting.name}.log")
            with memory:
                launched = time.perf_counter()
                with self.stop.waiting():
                    server.wait_ready(self.args.start_timeout)
                record["startup_seconds"] = round(time.perf_counter() - launched, 3)
                memory.phase("serving")
                with self.stop.waiting():
                    record["profile"] = server.client.get("/v1/models").json()["data"][0].get("profile")
                    self.measure(server, setting, record)
        except Stopped:
            record.update(status="stopped", error="stopped by SIGTERM (the time budget ran out); figures so far kept")
            stop_seconds = STOP_SECONDS
        except ServerExited as exc:
            record.update(status="unsupported" if exc.code == 2 else "failed", error=exc.line, exit_code=exc.code)
        except ModelsFailed as exc:  # e.g. out of memory, or an attention backend this machine lacks
            unusable = any("AttentionBackendError" in why for why in exc.reasons.values())
            record.update(status="unsupported" if unusable else "failed", error=str(exc)[:500])
        except Exception as exc:  # a refused request, a timeout: recorded, the other settings still run
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
        finally:
            if server is not None:
                server.stop(STOP_SECONDS if self.stop.asked else stop_seconds)
        record["peak_gpu_memory_gib"] = _gib(memory.peak_mib)
        # Loading (FP8 conversion, compiling) may use more than serving: each phase's peak, the device's memory in use
        record["peak_gpu_memory_loading_gib"] = _gib(memory.peaks.get("loading"))
        record["peak_gpu_memory_serving_gib"] = _gib(memory.peaks.get("serving"))
        return record

    def measure(self, server: Server, setting: Setting, record: dict) -> None:
        sizes = setting.sizes or (self.args.size,)
        per_size: dict[str, dict] = {}
        sent = 0  # requests to this server so far: each gets a prompt of its own (``take``)
        for index, size in enumerate(sizes):
            first, _ = self.request(server, setting, size, take(sent), seed=0)
            if index == 0:  # kept as measured, for a setting stopped before its end
                record["first_request_seconds"] = round(first, 4)
            warm = []
            for i in range(self.args.runs):
                warm.append(self.request(server, setting, size, take(sent + 1 + i), seed=1 + i))
                if index == 0:
                    record["e2e_seconds"] = [round(seconds, 4) for seconds, _ in warm]
            sent += 1 + self.args.runs
            per_size[size] = {
                "first_request_seconds": round(first, 4),
                "e2e_seconds": [round(s, 4) for s, _ in warm],
                "bodies": [b for _, b in warm],
            }
        main = per_size[sizes[0]]
        bodies = main.pop("bodies")
        stats = [body.get("stats") or {} for body in bodies]
        e2e = statistics.median(main["e2e_seconds"])
        record.update(
            e2e_seconds_median=round(e2e, 4), e2e_seconds=main["e2e_seconds"], first_request_seconds=main["first_request_seconds"]
        )
        record["first_over_warm"] = round(main["first_request_seconds"] / e2e, 3)
        pipeline = [s["pipeline_seconds"] for s in stats if "pipeline_seconds" in s]
        queue = [s["queue_seconds"] for s in stats if "queue_seconds" in s]
        encode = [s["encode_seconds"] for s in stats if "encode_seconds" in s]
        record["encode_seconds_median"] = round(statistics.median(encode), 4) if encode else None
        record["pipeline_seconds_median"] = round(statistics.median(pipeline), 4) if pipeline else None
        record["queue_seconds_median"] = round(statistics.median(queue), 4) if queue else None
        record["e2e_over_pipeline"] = round(e2e / record["pipeline_seconds_median"], 4) if pipeline else None
        partials = [body["partial_images"] for body in bodies if "partial_images" in body]
        if partials:
            record["partial_images_received"] = partials[0]
        calls = [s["transformer_calls"] for s in stats if "transformer_calls" in s]
        record["transformer_calls"] = calls[0] if calls else None
        for counter in ("prompt_encodings", "prompt_cache_hits"):  # per warm request: its prompt; the negative one kept
            counts = [s[counter] for s in stats if counter in s]
            record[counter] = counts[0] if counts else None
        if len(sizes) > 1:
            record["sizes"] = {}
            for size in sizes[1:]:
                entry = per_size[size]
                entry.pop("bodies")
                median = statistics.median(entry["e2e_seconds"])
                record["sizes"][size] = {
                    **entry,
                    "e2e_seconds_median": round(median, 4),
                    "first_over_warm": round(entry["first_request_seconds"] / median, 3),
                }
        if setting.new_prompt:
            seconds, _ = self.request(server, setting, sizes[0], OTHER_PROMPT, seed=99)
            record.update(new_prompt_seconds=round(seconds, 4), new_prompt_over_warm=round(seconds / e2e, 3))

    def environment(self) -> dict:
        return {
            "gpu": self.args.gpu_name,
            **package_versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "runs": self.args.runs,
        }


def _gib(mib: float | None) -> float | None:
    return None if mib is None else round(mib / 1024, 2)


def target_checks(record: dict) -> list[str]:
    """Each target that applies to a record, met (``ok``) or missed by how much."""
    checks = []

    def check(label: str, value: float | None, limit: float, unit: str) -> None:
        if value is None:
            return
        if value <= limit:
            checks.append(f"{label} ok")
        elif unit == "s":
            checks.append(f"{label} MISSED by {value - limit:.2f} s (+{(value / limit - 1) * 100:.0f}%)")
        else:
            checks.append(f"{label} MISSED: {value:.3f}x (+{value - limit:.3f})")

    setting = next((s for s in (*SETTINGS, *SMOKE_SETTINGS) if s.name == record["setting"]), None)
    if setting and setting.target_s is not None:
        check(f"≤ {setting.target_s:g} s", record.get("e2e_seconds_median"), setting.target_s, "s")
    check(f"first ≤ {FIRST_OVER_WARM}x warm", record.get("first_over_warm"), FIRST_OVER_WARM, "x")
    for size, entry in (record.get("sizes") or {}).items():
        check(f"first at {size} ≤ {FIRST_OVER_WARM}x warm", entry.get("first_over_warm"), FIRST_OVER_WARM, "x")
    check(f"new prompt length ≤ {FIRST_OVER_WARM}x warm", record.get("new_prompt_over_warm"), FIRST_OVER_WARM, "x")
    check(f"e2e/pipeline ≤ {E2E_OVER_PIPELINE}", record.get("e2e_over_pipeline"), E2E_OVER_PIPELINE, "x")
    if checks and "e2e/pipeline" in checks[-1] and "MISSED" in checks[-1] and record.get("encode_seconds_median") is not None:
        checks[-1] += f" (encoding the image: {record['encode_seconds_median']:.3f} s of it)"
    return checks


def markdown_table(records: list[dict]) -> str:
    """The records as a markdown table, with the targets met or missed."""

    def cell(value, fmt="{:.3f}") -> str:
        return "–" if value is None else fmt.format(value) if isinstance(value, float) else str(value)

    head = (
        "| setting | status | e2e median s | first s | first/warm | pipeline s | encode s | e2e/pipeline | transformer calls "
        "| peak GPU GiB | targets |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in records:
        if r["status"] != "ok":  # one line, no column breaks; a stopped setting's figures so far are kept
            error = " ".join(str(r.get("error") or "").split()).replace("|", "/")
            warm = r.get("e2e_seconds") or []
            median = statistics.median(warm) if warm else None
            lines.append(
                f"| {r['setting']} | {r['status']}: {error} | {cell(median)} | {cell(r.get('first_request_seconds'))} |"
                + " |" * 5
                + f" {cell(r.get('peak_gpu_memory_gib'), '{:.1f}')} | |"
            )
            continue
        targets = "; ".join(target_checks(r)) or "–"
        lines.append(
            f"| {r['setting']} | ok | {cell(r['e2e_seconds_median'])} | {cell(r['first_request_seconds'])} | {cell(r['first_over_warm'], '{:.2f}x')} "
            f"| {cell(r['pipeline_seconds_median'])} | {cell(r.get('encode_seconds_median'))} "
            f"| {cell(r['e2e_over_pipeline'], '{:.3f}x')} | {cell(r['transformer_calls'])} "
            f"| {cell(r['peak_gpu_memory_gib'], '{:.1f}')} | {targets} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", help="comma-separated setting names (default: all; see --list)")
    parser.add_argument("--runs", type=positive, default=None, help="warm requests per setting (median); default 3, smoke 2")
    parser.add_argument(
        "--size", type=image_size, default=None, help="WIDTHxHEIGHT of the requests (default 1024x1024, smoke 256x256)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results file, one JSON line per setting, appended (default bench/results/gpu.jsonl)",
    )
    parser.add_argument("--start-timeout", type=float, default=1800, help="seconds a server may take to be ready")
    parser.add_argument(
        "--smoke", action="store_true", help="a reduced random architecture on CPU: checks this script, measures nothing"
    )
    parser.add_argument("--list", action="store_true", help="print the settings and exit")
    args = parser.parse_args(argv)
    available = SMOKE_SETTINGS if args.smoke else SETTINGS
    if args.list:
        for s in available:
            print(
                f"{s.name:30} serve {' '.join(s.args) or '(defaults)':60} request {json.dumps(s.fields)}{'  edit' if s.edit else ''}"
            )
        return 0
    chosen = list(available)
    if args.settings:
        names = [n.strip() for n in args.settings.split(",") if n.strip()]
        unknown = [n for n in names if n not in {s.name for s in available}]
        if unknown:
            parser.error(f"unknown settings {', '.join(unknown)} (known: {', '.join(s.name for s in available)})")
        chosen = [s for s in available if s.name in names]
    args.gpu_name = visible_gpu_name()
    if not args.smoke and args.gpu_name is None:
        print(
            "no GPU visible (no GPU driver loaded, or torch.cuda.is_available() is false): the full-size benchmark needs one; nothing measured"
        )
        return 0
    if args.smoke:
        args.gpu_name = f"none (CPU smoke run; {args.gpu_name} visible)" if args.gpu_name else "none (CPU smoke run)"
    args.runs = args.runs or (2 if args.smoke else 3)
    args.size = args.size or ("256x256" if args.smoke else "1024x1024")
    out = args.out or REPO / "bench" / "results" / ("gpu-smoke.jsonl" if args.smoke else "gpu.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.parent / "logs"
    log_dir.mkdir(exist_ok=True)
    bench = Bench(args, log_dir)
    records = []
    with bench.stop.installed():
        for setting in chosen:
            if bench.stop.asked:
                break
            print(f"{setting.name}: serve {' '.join(setting.args) or '(defaults)'} ...", flush=True)
            record = bench.run(setting)
            records.append(record)
            with out.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            print(
                f"  {record['status']}"
                + (f": {record['error']}" if record["error"] else f", e2e median {record['e2e_seconds_median']:.3f} s"),
                flush=True,
            )
    print(f"\nresults appended to {out}; server logs in {log_dir}\n")
    print(markdown_table(records))
    if bench.stop.asked:
        return STOPPED_EXIT
    failed = [r["setting"] for r in records if r["status"] == "failed"]
    if failed:  # (a setting the server refuses is "unsupported", not failed)
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
