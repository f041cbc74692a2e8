"""Qwen-Image's VAE on one image: as diffusers runs it vs. with the server's fast routes (``models/vae_fast.py``).

The full-size VAE (the published architecture values, ``models/architectures/qwen-image.json``)
is built twice with the same random weights on the device: one copy as diffusers runs it, one
with ``models/vae_fast.prepare_vae`` installed. Each decodes one latent and encodes one image,
the two alternating for ``--runs`` rounds after a warm-up. Printed per path and operation: the
median seconds, the TFLOP (counted on the meta device) and the peak memory above the weights
(on CUDA, what the path allocated; on the CPU with ``--cpu-peak``, how much the resident set
grew, in a fresh process per path and operation); then the speed-ups and the largest difference
between the two paths' outputs, relative to the output's largest value. With ``--tiling`` a third
path joins: the fast routes with diffusers' tiling (``--vae-tiling on``: 256x256 tiles at a
192-pixel stride), compared with the fast routes. One JSON line with the figures ends the
output. Run from the repository root::

    python bench/vae_fast.py                                       # CPU, 512x512, float32
    python bench/vae_fast.py --size 1024x1024 --runs 1 --cpu-peak  # and each path's peak memory
    python bench/vae_fast.py --device cuda --size 1024x1024 --dtype bfloat16
    python bench/vae_fast.py --size 1024x1024 --runs 1 --cpu-peak --tiling
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from cli_args import device_name, image_size, parse_size, positive  # bench/: this script's folder, first on sys.path when it runs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--size", type=image_size, default="512x512", help="WIDTHxHEIGHT of the image (multiples of 16)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--runs", type=positive, default=3)
    parser.add_argument(
        "--cpu-peak", action="store_true", help="on the CPU, also each path's peak resident memory (a fresh process each)"
    )
    parser.add_argument("--tiling", action="store_true", help="also the fast routes with tiling (--vae-tiling on)")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # --help and wrong arguments answer before torch is imported (seconds)

import torch  # noqa: E402

if __name__ == "__main__" and ARGS.device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"{Path(__file__).name}: --device {ARGS.device}: no CUDA device is available here")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwen_image_server.models.random_arch import _constructing, init_random_  # noqa: E402
from qwen_image_server.models.random_source import architectures  # noqa: E402
from qwen_image_server.models.vae_fast import prepare_vae  # noqa: E402


def build_vae(device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKLQwenImage

    values = {k: v for k, v in architectures()["Qwen/Qwen-Image"]["vae"].items() if not k.startswith("_")}
    with _constructing(device, dtype):
        vae = AutoencoderKLQwenImage(**values)
    init_random_(vae, seed=0)
    return vae.eval()


def count_flops(width: int, height: int, dtype: torch.dtype) -> dict[str, float]:
    """TFLOP of one decode and one encode on each path, counted on the meta device (shapes only, nothing runs)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    plain = build_vae("meta", dtype)
    vaes = {"diffusers": plain, "fast": copy.deepcopy(plain)}
    prepare_vae(vaes["fast"])
    latent = torch.empty(1, plain.config.z_dim, 1, height // 8, width // 8, device="meta", dtype=dtype)
    image = torch.empty(1, 3, 1, height, width, device="meta", dtype=dtype)
    out = {}
    for path, vae in vaes.items():
        for what in ("decode", "encode"):
            with FlopCounterMode(display=False) as counter:
                vae.decode(latent) if what == "decode" else vae.encode(image)
            out[f"{what}_{path}_tflop"] = round(counter.get_total_flops() / 1e12, 2)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device: str) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def peak_of(fn, device: str) -> float | None:
    """GiB allocated at the peak of ``fn`` above what was allocated before it (CUDA only)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - before) / 2**30, 3)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def cpu_peak(path: str, what: str, width: int, height: int, dtype: torch.dtype) -> float:
    """In this (fresh) process: GiB the resident set grows by at the peak of one ``what`` on ``path`` (CPU)."""
    import gc

    vae = build_vae("cpu", dtype)
    if path in ("fast", "tiled"):
        prepare_vae(vae)
    if path == "tiled":
        vae.enable_tiling()
    latent = torch.randn(1, vae.config.z_dim, 1, height // 8, width // 8, dtype=dtype)
    image = torch.rand(1, 3, 1, height, width, dtype=dtype) * 2 - 1
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:  # Linux: the peak (VmHWM) starts again from the current size
        clear.write("5")
    before = _status_kib("VmRSS")
    with torch.inference_mode():
        vae.decode(latent) if what == "decode" else vae.encode(image)
    peak = _status_kib("VmHWM")
    return round((peak - before) / 2**20, 2)


def cpu_peaks(width: int, height: int, dtype_name: str, paths: tuple[str, ...]) -> dict[str, float]:
    """``cpu_peak`` of each path and operation, each in a fresh process (a process's peak only ever grows)."""
    import subprocess

    out = {}
    for path in paths:
        for what in ("decode", "encode"):
            code = (
                f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torch, vae_fast; "
                f"print(vae_fast.cpu_peak({path!r}, {what!r}, {width}, {height}, torch.{dtype_name}))"
            )
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            out[f"{what}_{path}_peak_rss_gib"] = float(done.stdout.split()[-1])
    return out


def main(args: argparse.Namespace) -> None:
    width, height = parse_size(args.size)
    dtype = getattr(torch, args.dtype)
    device = args.device
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(f"device {name}, torch {torch.__version__}, {width}x{height}, {args.dtype}, {args.runs} runs each")

    vaes = {"diffusers": build_vae(device, dtype), "fast": build_vae(device, dtype)}  # the same seed: the same weights
    layers = prepare_vae(vaes["fast"])
    if args.tiling:
        vaes["tiled"] = vaes["fast"]  # the same module, tiling switched on for its own calls

    z_dim = vaes["diffusers"].config.z_dim
    generator = torch.Generator(device).manual_seed(0)
    latent = torch.randn(1, z_dim, 1, height // 8, width // 8, generator=generator, device=device, dtype=dtype)
    image = torch.rand(1, 3, 1, height, width, generator=generator, device=device, dtype=dtype) * 2 - 1

    def decode(path: str):
        def run():
            vaes[path].use_tiling = path == "tiled"
            return vaes[path].decode(latent, return_dict=False)[0]

        return run

    def encode(path: str):
        def run():
            vaes[path].use_tiling = path == "tiled"
            return vaes[path].encode(image).latent_dist.mode()

        return run

    results: dict[str, dict] = {path: {"decode": [], "encode": []} for path in vaes}
    outputs: dict[str, tuple] = {}
    peaks: dict[str, dict] = {}
    with torch.inference_mode():
        for path in vaes:  # warm-up, the outputs compared, the peaks
            outputs[path] = (decode(path)().float(), encode(path)().float())
            peaks[path] = {"decode": peak_of(decode(path), device), "encode": peak_of(encode(path), device)}
        for _ in range(args.runs):  # the two paths alternate
            for path in vaes:
                results[path]["decode"].append(timed(decode(path), device))
                results[path]["encode"].append(timed(encode(path), device))

    summary: dict = {"device": name, "size": f"{width}x{height}", "dtype": args.dtype, "layers": layers}
    summary.update(count_flops(width, height, dtype))
    if args.cpu_peak and device == "cpu":
        summary.update(cpu_peaks(width, height, args.dtype, tuple(vaes)))
    for path in vaes:
        for what in ("decode", "encode"):
            median = statistics.median(results[path][what])
            summary[f"{what}_{path}_s"] = round(median, 4)
            peak = peaks[path][what]
            if peak is not None:
                summary[f"{what}_{path}_peak_gib"] = peak
            tflop = summary.get(f"{what}_{path}_tflop")  # counted for the untiled paths
            line = f"{path:9} {what}: {median * 1000:9.1f} ms" + (f", {tflop} TFLOP" if tflop is not None else "")
            if peak is None:
                peak = summary.get(f"{what}_{path}_peak_rss_gib")
            print(line + (f", peak {peak} GiB above the weights" if peak is not None else ""))
    for index, what in enumerate(("decode", "encode")):
        ratio = summary[f"{what}_diffusers_s"] / summary[f"{what}_fast_s"]
        reference, other = outputs["diffusers"][index], outputs["fast"][index]
        scale = float(reference.abs().max()) or 1.0
        difference = float((reference - other).abs().max()) / scale
        summary[f"{what}_speedup"] = round(ratio, 2)
        summary[f"{what}_max_difference"] = difference
        print(f"{what}: fast routes {ratio:.2f}x as fast; largest difference {difference:.2e} of the output's largest value")
        if "tiled" in vaes:
            cost = summary[f"{what}_tiled_s"] / summary[f"{what}_fast_s"]
            tiled = outputs["tiled"][index]
            mean = float((tiled - other).abs().mean()) / scale
            summary[f"{what}_tiled_time_ratio"] = round(cost, 2)
            summary[f"{what}_tiled_mean_difference"] = mean
            print(f"{what}: tiled {cost:.2f}x the time of untiled; mean difference {mean:.2e} of the output's largest value")
    print(json.dumps(summary))


if __name__ == "__main__":
    main(ARGS)
