"""Imports point one way: no layer of the package imports a layer above it.

The layers, top first (docs/architecture.md): the entry points (``cli``, ``ray_app``)
wire everything together; then ``api``, ``serving``, ``protocol`` (the request and
response schemas that api and serving share), ``engine``, ``worker``
(``engine/worker.py``, the spawned process), ``models``; at the bottom the shared
modules every layer may import (``errors``, ``config`` with ``config_files`` and
``config_scoped``, ``limits``, ``jobs``, ``images``, the package's ``__init__``), which
import no layer. Every import counts, also one inside a function or under
``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "qwen_image_server"
SRC = Path(__file__).resolve().parents[2] / "src"

#: Top first: a module may import its own layer and those after it.
LAYERS = ("entry", "api", "serving", "protocol", "engine", "worker", "models", "shared")
#: Module (dotted, without the package) or sub-package → layer; the longest matching prefix wins.
LAYER_OF = {
    "cli": "entry",
    "ray_app": "entry",
    "cli_settings": "entry",
    "cli_run": "entry",
    "api": "api",
    "serving": "serving",
    "storage": "serving",
    "protocol": "protocol",
    "engine": "engine",
    "engine.worker": "worker",
    "engine.worker_device": "worker",
    "models": "models",
    "": "shared",  # the package's __init__
    "errors": "shared",
    "config": "shared",
    "limits": "shared",
    "config_files": "shared",
    "config_scoped": "shared",
    "config_urls": "shared",
    "jobs": "shared",
    "images": "shared",
    "logs": "shared",
}


def _key(module: str) -> str | None:
    """The ``LAYER_OF`` entry that places ``qwen_image_server.<module>``: its longest listed prefix."""
    parts = module.split(".") if module else []
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYER_OF:
            return ".".join(parts[:n])
    return "" if not parts else None


def layer_of(module: str) -> str | None:
    """The layer of ``qwen_image_server.<module>`` (dotted), or None when no entry places it."""
    key = _key(module)
    return None if key is None else LAYER_OF[key]


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    """``(dotted name inside the package, is a package __init__)`` of a file under ``root/<package>``."""
    parts = list(path.relative_to(root / PACKAGE).with_suffix("").parts)
    is_init = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_init else parts), is_init


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_init: bool) -> list[str]:
    """The package modules (dotted, without the package) an import statement reaches; others are left out.

    ``from X import a`` reaches ``X.a`` when that is placed more precisely than ``X``
    (``from ..engine import worker``), else ``X`` (``from ..jobs import Job``).
    """
    if isinstance(node, ast.Import):
        found = [alias.name for alias in node.names]
    else:
        if node.level == 0:
            base = (node.module or "").split(".")
        else:
            here = module.split(".") if module else []
            package = here if is_init else here[:-1]
            up = node.level - 1
            if up > len(package):
                return []
            base = [PACKAGE, *package[: len(package) - up], *(node.module.split(".") if node.module else [])]
        found = []
        for alias in node.names:
            full = ".".join([*base, alias.name])
            inner, outer = full.removeprefix(PACKAGE + "."), ".".join(base).removeprefix(PACKAGE + ".")
            found.append(full if _key(inner) not in (None, _key(outer)) else ".".join(base))
    ours = [name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")]
    return [name.removeprefix(PACKAGE).removeprefix(".") for name in ours]


def violations(root: Path) -> list[str]:
    """``file:line: <module> (<layer>) imports <target> (<layer>)`` for every import of a higher layer,
    and ``file: not placed in any layer`` for a module the table does not know."""
    found = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        module, is_init = _module_name(path, root)
        layer = layer_of(module)
        where = path.relative_to(root).as_posix()
        if layer is None:
            found.append(f"{where}: not placed in any layer (add it to LAYER_OF)")
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in dict.fromkeys(_targets(node, module, is_init)):
                target_layer = layer_of(target)
                if target_layer is not None and LAYERS.index(target_layer) < LAYERS.index(layer):
                    name = ".".join(filter(None, [PACKAGE, target]))
                    found.append(f"{where}:{node.lineno}: {module or PACKAGE} ({layer}) imports {name} ({target_layer})")
    return found


def test_no_layer_imports_a_layer_above_it():
    assert violations(SRC) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for folder in {p.parent for p in (tmp_path / PACKAGE).rglob("*.py")}:
        (folder / "__init__.py").touch()
    return tmp_path


def test_the_check_names_each_back_pointing_import(tmp_path):
    root = _tree(
        tmp_path,
        {
            "models/runner.py": "from ..engine.local import LocalEngine\n\n\ndef f():\n    from ..serving import service\n",
            "engine/worker.py": "import qwen_image_server.serving.inputs\n",
            "jobs.py": "from .engine import base\n",
            "protocol/images.py": "from ..api.routes import router\n",
            "engine/local.py": "from .worker import main\nfrom ..models.runner import PipelineRunner\nfrom ..jobs import Job\n",
            "api/routes.py": "from ..serving.service import ImageService\nfrom ..protocol.images import GenerationRequest\n",
            "cli.py": "from .api.app import create_app\nfrom .engine.local import LocalEngine\n",
        },
    )
    assert violations(root) == [
        f"{PACKAGE}/engine/worker.py:1: engine.worker (worker) imports {PACKAGE}.serving.inputs (serving)",
        f"{PACKAGE}/jobs.py:1: jobs (shared) imports {PACKAGE}.engine (engine)",
        f"{PACKAGE}/models/runner.py:1: models.runner (models) imports {PACKAGE}.engine.local (engine)",
        f"{PACKAGE}/models/runner.py:5: models.runner (models) imports {PACKAGE}.serving (serving)",
        f"{PACKAGE}/protocol/images.py:1: protocol.images (protocol) imports {PACKAGE}.api.routes (api)",
    ]


def test_the_check_resolves_imports_relative_to_a_package_init(tmp_path):
    root = _tree(tmp_path, {"models/__init__.py": "from ..engine import local\nfrom . import runner\n", "models/runner.py": ""})
    assert violations(root) == [f"{PACKAGE}/models/__init__.py:1: models (models) imports {PACKAGE}.engine (engine)"]


def test_a_module_outside_the_table_is_reported(tmp_path):
    root = _tree(tmp_path, {"newthing.py": "", "models/spec.py": ""})
    assert violations(root) == [f"{PACKAGE}/newthing.py: not placed in any layer (add it to LAYER_OF)"]


def test_layers_of_modules():
    assert layer_of("engine.worker") == "worker"
    assert layer_of("engine.local") == "engine"
    assert layer_of("engine") == "engine"
    assert layer_of("models.runner") == "models"
    assert layer_of("") == "shared"
    assert layer_of("jobs") == "shared"
    assert layer_of("nowhere") is None


_SERVE_UNTIL_LISTENING = """
import sys, uvicorn
from qwen_image_server.cli import main

def listening(*args, **kwargs):  # where the port would open: what has the API process imported by then?
    print("imported:", ",".join(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
    raise SystemExit(0)

uvicorn.run = listening
sys.argv = ["qwen-image-server", "serve", "--device", "cpu", "--model", sys.argv[1], "--port", "0"]
main()
"""


def test_cli_api_process_on_cpu_validates_plans_and_serves_without_torch(tiny_t2i):
    """The API process validates, plans and serves; only workers run pipelines. On the CPU it imports none of
    torch, diffusers or transformers (about a second of CPU and 200 MB it would never use)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "QIS_WORKER_START": "spawn"}  # no forkserver: nothing is started, nothing left behind
    done = subprocess.run(
        [sys.executable, "-c", _SERVE_UNTIL_LISTENING, f"tiny={tiny_t2i}"], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported: \n" in done.stdout, done.stdout


#: Lines a module may have: at most 400 (docs/architecture.md); one that would grow past them is split first.
MAX_MODULE_LINES = 400


def test_no_module_is_longer_than_a_newcomer_reads_at_once():
    long = {
        str(path.relative_to(SRC)): lines
        for path in SRC.rglob("*.py")
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"split these modules (at most {MAX_MODULE_LINES} lines each): {long}"
