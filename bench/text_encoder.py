"""Qwen-Image's text encoder on one prompt: the stock forward vs. the last hidden state only (``models/text_encoder_fast.py``).

The published Qwen2.5-VL-7B architecture (``models/architectures/qwen-image.json``) is built
with random weights on the device, ``--layers`` decoder layers deep (28 is the full model;
the default on a CPU is 2, every width as published). One prompt of ``--tokens`` token ids is
encoded the way the pipelines call the encoder (``output_hidden_states=True``, the last one
read): first by the stock forward, then, on the same module, by the prepared one. Printed for
each: the median seconds of ``--runs`` calls, the TFLOP (PyTorch's FLOP counter, at the chosen
depth and extended to the full 28 layers) and the peak memory above the weights (CUDA: what the
call allocated; CPU: how much the resident set grew, in a fresh process per forward), then
whether the two outputs are equal. One JSON line with the figures ends the output::

    python bench/text_encoder.py                                   # CPU, 2 layers, 1024 tokens, bf16
    python bench/text_encoder.py --device cuda --layers 28         # the whole encoder on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cli_args import device_name, positive  # bench/: this script's folder, first on sys.path when it runs

FULL_LAYERS = 28


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--layers", type=positive, help=f"decoder layers (default: {FULL_LAYERS} on CUDA, 2 on the CPU)")
    parser.add_argument(
        "--tokens", type=positive, default=1024, help="prompt tokens (diffusers' limit is 1024, plus 34 of template)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--runs", type=positive, default=3)
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # --help and wrong arguments answer before torch is imported (seconds)

import torch  # noqa: E402

if __name__ == "__main__" and ARGS.device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"{Path(__file__).name}: --device {ARGS.device}: no CUDA device is available here")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwen_image_server.models.random_arch import _constructing, init_random_, text_encoder_config  # noqa: E402
from qwen_image_server.models.random_source import architectures  # noqa: E402
from qwen_image_server.models.text_encoder_fast import prepare_text_encoder  # noqa: E402
from qwen_image_server.models.tiny import _make_tokenizer  # noqa: E402


def build(device: str, dtype: torch.dtype, layers: int):
    from transformers import Qwen2_5_VLForConditionalGeneration

    arch = architectures()["Qwen/Qwen-Image"]
    text = {**arch["text_encoder"]["text_config"], "num_hidden_layers": layers, "max_window_layers": layers}
    config = text_encoder_config({**arch, "text_encoder": {**arch["text_encoder"], "text_config": text}}, _make_tokenizer())
    with _constructing(device, dtype):
        module = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    if device != "meta":
        init_random_(module, seed=1)
    return module.eval().requires_grad_(False)


def inputs(module, tokens: int, device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(300, module.config.text_config.vocab_size, (1, tokens), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device), "output_hidden_states": True}


def encode(module, batch: dict) -> torch.Tensor:
    return module(**batch).hidden_states[-1]


def counted(module, batch: dict) -> tuple[torch.Tensor, float, float]:
    """One encoding under PyTorch's FLOP counter: the output, its TFLOP and the TFLOP the same call would take with
    all 28 decoder layers (each further layer as many as the first)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = encode(module, batch)
    total = counter.get_total_flops()
    layer = sum(
        flops
        for name, counts in counter.get_flop_counts().items()
        if name.endswith("language_model.layers.0")
        for flops in counts.values()
    )
    layers = module.config.text_config.num_hidden_layers
    return out, total / 1e12, (total + (FULL_LAYERS - layers) * layer) / 1e12


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def cpu_peak(path: str, layers: int, tokens: int, dtype: torch.dtype) -> float:
    """In this (fresh) process: GiB the resident set grows by at the peak of one encoding on ``path``."""
    import gc

    module = build("cpu", dtype, layers)
    if path == "prepared":
        prepare_text_encoder(module)
    batch = inputs(module, tokens, "cpu")
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:  # Linux: the peak (VmHWM) starts again from the current size
        clear.write("5")
    before = _status_kib("VmRSS")
    with torch.inference_mode():
        encode(module, batch)
    return round((_status_kib("VmHWM") - before) / 2**20, 3)


def cpu_peaks(layers: int, tokens: int, dtype_name: str) -> dict[str, float]:
    out = {}
    for path in ("stock", "prepared"):
        code = (
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torch, text_encoder; "
            f"print(text_encoder.cpu_peak({path!r}, {layers}, {tokens}, torch.{dtype_name}))"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[path] = float(done.stdout.split()[-1])
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def main(args: argparse.Namespace) -> None:
    device, dtype = args.device, getattr(torch, args.dtype)
    cuda = device.startswith("cuda")
    layers = args.layers or (FULL_LAYERS if cuda else 2)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device {name}, torch {torch.__version__}, {layers} layers, {args.tokens} tokens, {args.dtype}, {args.runs} runs")

    module = build(device, dtype, layers)
    batch = inputs(module, args.tokens, device)
    summary: dict = {"device": name, "layers": layers, "tokens": args.tokens, "dtype": args.dtype}
    weights = {"stock": sum(p.numel() * p.element_size() for p in module.parameters())}
    outputs, seconds, peaks, flops, full = {}, {}, {}, {}, {}
    with torch.inference_mode():
        for path in ("stock", "prepared"):
            if path == "prepared":
                prepare_text_encoder(module)
                weights[path] = sum(p.numel() * p.element_size() for p in module.parameters())
            out, flops[path], full[path] = counted(module, batch)  # warm-up, the FLOPs, the output compared
            outputs[path] = out.float()
            if cuda:
                sync(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                encode(module, batch)
                sync(device)
                peaks[path] = round((torch.cuda.max_memory_allocated(device) - before) / 2**30, 3)
            runs = []
            for _ in range(args.runs):
                sync(device)
                started = time.perf_counter()
                encode(module, batch)
                sync(device)
                runs.append(time.perf_counter() - started)
            seconds[path] = statistics.median(runs)
    if not cuda:
        peaks = cpu_peaks(layers, args.tokens, args.dtype)
    for path in ("stock", "prepared"):
        summary[path] = {
            "s": round(seconds[path], 4),
            "tflop": round(flops[path], 3),
            "tflop_28_layers": round(full[path], 3),
            "weights_gib": round(weights[path] / 2**30, 3),
            "peak_above_weights_gib": peaks[path],
        }
        print(
            f"{path:8}: {seconds[path] * 1000:9.1f} ms, {flops[path]:.3f} TFLOP ({full[path]:.2f} with 28 layers), "
            f"weights {weights[path] / 2**30:.2f} GiB, peak {peaks[path]} GiB above the weights"
        )
    summary["equal"] = bool(torch.equal(outputs["stock"], outputs["prepared"]))
    summary["speedup"] = round(seconds["stock"] / seconds["prepared"], 3)
    print(f"outputs equal: {summary['equal']}; prepared {summary['speedup']}x as fast")
    print(json.dumps(summary))


if __name__ == "__main__":
    main(ARGS)
