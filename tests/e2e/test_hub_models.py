"""Models given as hub ids, loaded offline from a hub-layout cache (as on a machine that downloaded them once).

The cache (``hub_cache``, tests/model_files.py) is built from the tiny models:
``models--ORG--NAME/snapshots/REV/...`` with ``refs/main`` and a second branch ``refs/v2``
pointing at another snapshot (other weights).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from model_files import EDIT_MAIN_REV, OPTIONS_SERVER_IDS, offline_env

_RUN_EDITS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from qwen_image_server.jobs import Job
    from qwen_image_server.models import processor, runner
    from qwen_image_server.models.spec import resolve_model

    def edit() -> dict:
        spec = resolve_model(sys.argv[1])
        run = runner.PipelineRunner(spec, device="cpu")
        image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
        out = run.run(Job(mode="edit", prompt="make it blue", seeds=[3], num_inference_steps=2, images=[image]))[0]
        return {
            "is_hub": spec.is_hub, "revision": spec.revision, "kind": spec.kind, "options": spec.options,
            "processor": type(run.pipe.processor).__name__, "size": list(out.size), "standard_loader_folders": seen,
        }

    seen = []
    # This machine's own branch first, unpatched: no torchvision on a CPU machine; transformers' standard loading
    # with torchvision where it loads (a GPU machine).
    results = {"this-machine": {**edit(), "torchvision": processor.torchvision_available()}}
    # The image-only loader, on any machine
    processor.torchvision_available = lambda: False
    if hasattr(runner, "torchvision_available"):
        runner.torchvision_available = processor.torchvision_available
    seen = []
    results["image-only"] = edit()
    seen = []
    # Then the branch that machines with a working torchvision take, on any machine:
    # transformers' standard Qwen2VLProcessor loading, here answered by the image-only loader.
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    def standard(folder, *args, **kwargs):
        seen.append(str(folder))
        return processor.build_image_only_processor(
            Qwen2VLImageProcessorPil.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        )

    processor.torchvision_available = lambda: True
    if hasattr(runner, "torchvision_available"):  # wherever the loader looks the check up
        runner.torchvision_available = processor.torchvision_available
    processor.Qwen2VLProcessor.from_pretrained = staticmethod(standard)
    results["torchvision"] = edit()
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def hub_edits(hub_cache) -> dict:
    """The hub id ``test-org/tiny-edit`` loaded offline and used for an edit in a fresh process (the hub's settings
    are read at import): with this machine's own processor loading, then on each branch of it, ``image-only`` and
    ``torchvision``."""
    done = subprocess.run(
        [sys.executable, "-c", _RUN_EDITS, "test-org/tiny-edit"],
        env={**os.environ, **offline_env(hub_cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hub_edit_model_loads_offline_and_edits(hub_edits):
    """With this machine's own processor loading (transformers' standard one where torchvision loads, as on a GPU
    machine, where every edit from a hub id once failed), and with the image-only loader on any machine."""
    out = hub_edits["this-machine"]
    assert out["is_hub"] and out["revision"] is None and out["kind"] == "edit"
    assert out["processor"] != "NoneType"
    assert out["options"]["edit_area"] == 256 * 256, "the sidecar file is read from the hub snapshot too"
    assert out["size"][0] > 0
    image_only = hub_edits["image-only"]
    assert image_only["processor"] != "NoneType" and image_only["size"] == out["size"]
    assert image_only["standard_loader_folders"] == []


def test_hub_edit_model_on_the_torchvision_branch_gets_a_processor(hub_edits):
    """Where torchvision loads, the processor is still loaded (from the snapshot), never passed as None."""
    out = hub_edits["torchvision"]
    assert out["processor"] != "NoneType"
    assert len(out["standard_loader_folders"]) == 1
    assert out["standard_loader_folders"][0].endswith(f"snapshots/{EDIT_MAIN_REV}/processor")


def test_unknown_revision_is_a_start_up_error(hub_cache, tiny_t2i):
    done = run_cli("serve", "--port", "0", "--model", "test-org/tiny-edit@nope", env=offline_env(hub_cache))
    assert done.returncode == 2
    assert "test-org/tiny-edit at revision nope" in done.stderr


def _edit(base_url: str, model: str) -> np.ndarray:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    response = httpx.post(
        f"{base_url}/v1/images/edits",
        data={"model": model, "prompt": "make it blue", "seed": "5", "num_inference_steps": "2"},
        files={"image": ("in.png", buf.getvalue(), "image/png")},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))))


@pytest.mark.e2e
def test_server_edits_with_hub_ids_offline_at_each_revision(options_server):
    """The shared server of model options (tests/model_files.py) serves ``test-org/tiny-edit`` (as ``tiny-edit``) and
    ``edit-v2=test-org/tiny-edit@v2`` from the hub cache, offline."""
    server = options_server
    models = {m["id"] for m in httpx.get(f"{server.base_url}/v1/models").json()["data"]}
    assert models == OPTIONS_SERVER_IDS and {"tiny-edit", "edit-v2"} <= models
    main, v2 = _edit(server.base_url, "tiny-edit"), _edit(server.base_url, "edit-v2")
    assert main.shape == v2.shape
    assert not np.array_equal(main, v2), "the v2 revision has other weights, so the same seed gives another image"
