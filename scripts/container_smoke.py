"""The container image's own test, run by the Dockerfile's ``test`` stage inside the build.

A machine that can build images but not run containers still proves the image
works: as the image's user and with its environment, two tiny models are written to
``/models``, the image's default command (``qwen-image-server serve``) serves them
offline, the image's HEALTHCHECK must pass, and one generation and one edit must
return images. The seeds' environment names are checked with ``plan``. Any failure
exits non-zero, which fails the build.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

HEALTHCHECK = ["/opt/qis/bin/python", "/opt/qis/healthcheck.py"]
MODELS = {"qwen-image-tiny": "text-to-image", "qwen-image-edit-tiny": "edit"}
START_TIMEOUT = 300.0


def check(condition: bool, what: str, detail: str = "") -> None:
    """Stop the build with ``what`` (and ``detail``) unless ``condition`` holds."""
    if not condition:
        sys.exit(f"container smoke test FAILED: {what} {detail}".rstrip())
    print(f"ok: {what}", flush=True)


def free_port() -> int:
    """A port nobody listens on: a build step shares the build machine's network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image_of(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def wait_until_healthy(server: subprocess.Popen, env: dict) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            check(False, f"the server keeps running (it exited with {server.returncode})")
        if subprocess.run(HEALTHCHECK, env=env, capture_output=True).returncode == 0:
            return
        time.sleep(1)
    check(False, f"the HEALTHCHECK passes within {START_TIMEOUT:.0f} s")


def serve_and_call(models: Path) -> None:
    port = free_port()
    # PORT and HOST are the seeds' names; they win over the image's QIS_HOST.
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(["qwen-image-server", "serve"], env=env)
    try:
        wait_until_healthy(server, env)
        check(True, "the HEALTHCHECK passes (/ready on PORT)")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, trust_env=False) as http:
            check(http.get("/health").status_code == 200, "/health answers 200")
            ids = {model["id"] for model in http.get("/v1/models").json()["data"]}
            check(ids == set(MODELS), f"the folders in {models} are served by name: {sorted(ids)}")
            generated = http.post(
                "/v1/images/generations",
                json={
                    "model": "qwen-image-tiny",
                    "prompt": "a lighthouse",
                    "size": "256x256",
                    "num_inference_steps": 2,
                    "seed": 1,
                },
            )
            check(generated.status_code == 200, "a generation succeeds", f"{generated.status_code} {generated.text[:300]}")
            check(image_of(generated.json()["data"][0]).size == (256, 256), "the generation is a 256x256 image")
            picture = io.BytesIO()
            Image.new("RGB", (96, 64), (200, 40, 40)).save(picture, format="PNG")
            edited = http.post(
                "/v1/images/edits",
                data={"model": "qwen-image-edit-tiny", "prompt": "make it blue", "num_inference_steps": "2", "seed": "1"},
                files={"image": ("in.png", picture.getvalue(), "image/png")},
            )
            check(edited.status_code == 200, "an edit succeeds", f"{edited.status_code} {edited.text[:300]}")
            image_of(edited.json()["data"][0]).load()
            check(True, "the edit is an image")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    # After a graceful shutdown the server exits with 128 + SIGTERM (a normal interpreter exit, cleanups run)
    check(server.returncode == 128 + signal.SIGTERM, "the server stops on SIGTERM", f"exit {server.returncode}")


def plan_output(**env: str) -> str:
    """``qwen-image-server plan`` (no model is loaded) under the image's environment plus ``env``."""
    result = subprocess.run(["qwen-image-server", "plan"], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    check(result.returncode == 0, f"plan with {sorted(env)} succeeds", result.stderr.strip()[-300:])
    return result.stdout


def seed_names(models: Path) -> None:
    t2i, edit = str(models / "qwen-image-tiny"), str(models / "qwen-image-edit-tiny")
    out = plan_output(MODEL_PATH=t2i, MODEL_NAME="Qwen-Image")
    check("Qwen-Image:" in out and "edit-tiny" not in out, "seed 002's MODEL_PATH and MODEL_NAME replace /models")
    out = plan_output(QWEN_IMAGE_LOCATION=t2i, QWEN_IMAGE_EDIT_LOCATION=edit)
    check("qwen-image-tiny:" in out and "qwen-image-edit-tiny:" in out, "seed 000's QWEN_IMAGE_*_LOCATION serve both")
    out = plan_output(MODEL_PATH_EDIT=edit)
    check("qwen-image-edit-tiny:" in out and "qwen-image-tiny:" not in out, "seed 000's MODEL_PATH_EDIT alone")


def main() -> None:
    check(os.getuid() != 0, f"the image runs as a non-root user (uid {os.getuid()})")
    models = Path(os.environ["QIS_MODELS_DIR"])
    for name, kind in MODELS.items():
        subprocess.run(["qwen-image-server", "tiny-model", str(models / name), "--kind", kind], check=True)
    seed_names(models)
    serve_and_call(models)
    print("container smoke test passed", flush=True)


if __name__ == "__main__":
    main()
