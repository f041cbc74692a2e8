"""How the suite is marked and split (a plugin of tests/conftest.py): the ``e2e`` mark, where Ray stops, and which
tests each of ``scripts/test.sh``'s two pytest processes (pytest-xdist) runs."""

from __future__ import annotations

import atexit
import os
import re
import sys
from pathlib import Path

import pytest

# --- markers ------------------------------------------------------------------------------------

REAL_SERVER_FIXTURES = {"server", "options_server", "start_server", "ray_serve", "ray_server", "any_server"}
#: Unit modules whose tests load and run tiny pipelines (seconds each on a CPU, minutes in all).
PIPELINE_MODULES = {
    "test_attention", "test_cfg_batch", "test_compile", "test_determinism", "test_determinism_gpu", "test_fp8",
    "test_lora_offload", "test_lora_runtime", "test_memory", "test_memory_gpu", "test_models", "test_random_arch", "test_shared_components",
    "test_step_cache", "test_bench_gpu", "test_vae_fast", "test_prompt_cache", "test_random_sources",
    "test_text_encoder_fast", "test_int4",
}  # fmt: skip


def _real_module(path: Path) -> bool:
    """A module whose every test runs the real thing: one in tests/e2e, or one that runs tiny pipelines."""
    return "e2e" in path.parts or path.stem in PIPELINE_MODULES


def _deselects_e2e(markexpr: str) -> bool:
    """Whether ``-m markexpr`` deselects every test marked ``e2e``, whatever its other marks: the expression is
    false with ``e2e`` set under each assignment of the other names it uses (expressions with keyword arguments or
    more than 8 other names are taken as keeping them)."""
    from _pytest.mark.expression import Expression

    if not markexpr or "=" in markexpr:
        return False
    names = set(re.findall(r"[\w:+\-.\[\]\\/]+", markexpr)) - {"and", "or", "not", "e2e"}
    if "e2e" not in markexpr or len(names) > 8:
        return False
    try:
        expression = Expression.compile(markexpr)
    except Exception:  # pytest reports a malformed expression itself, after collection
        return False
    others = sorted(names)
    for bits in range(2 ** len(others)):
        marks = {"e2e"} | {name for i, name in enumerate(others) if bits >> i & 1}
        if expression.evaluate(lambda name, /, marks=marks, **kwargs: name in marks):
            return False
    return True


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    """With ``-m "not e2e"`` a module whose every test is marked ``e2e`` (``_real_module``) is not even imported:
    collecting it would import torch, diffusers and transformers (seconds in each test process) only to deselect
    all it holds. Paths named on the command line are collected as usual."""
    if collection_path.suffix == ".py" and _real_module(collection_path) and _deselects_e2e(config.option.markexpr):
        return True
    return None


def pytest_collection_modifyitems(items):
    """``e2e`` marks what runs the real thing: a test in tests/e2e, one on a real server, one that runs tiny
    pipelines, or one that starts the command line in a process (``test_cli_*``, ``test_plan_command*``).
    ``-m "not e2e"`` is the fast rest: pure logic and the in-process API on the fake engine."""
    for item in items:
        real = _real_module(item.path) or REAL_SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
        real = real or item.name.startswith(("test_cli_", "test_plan_command"))
        if real:
            item.add_marker(pytest.mark.e2e)


# --- Ray's lifetime ------------------------------------------------------------------------------
_LAST_RAY_TEST: list[str] = []  # the node id of the last test that uses Ray, once the order is final


def _any_server_case(item) -> str | None:
    """The engine an ``any_server`` test runs on (``local`` or ``ray``); None for other tests."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("any_server") if callspec is not None else None


def _uses_ray(item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    return bool(names & {"ray_serve", "ray_server"}) or _any_server_case(item) == "ray"


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    ray_tests = [item.nodeid for item in session.items if _uses_ray(item)]
    _LAST_RAY_TEST[:] = ray_tests[-1:]
    # The workers' split below reads node ids only: it must put exactly the tests on Ray together, and every test
    # on the shared server in the unit of the modules listed as using it.
    wrong = [item.nodeid for item in session.items if (work_unit(item.nodeid) == "ray") != _uses_ray(item)]
    if wrong:
        raise pytest.UsageError(f"work_unit() and _uses_ray() disagree on {wrong[:5]}: fix work_unit in tests/suite_split.py")
    for fixture, modules in SHARED_SERVERS.items():
        on_server = {Path(item.nodeid.partition("::")[0]).stem for item in session.items if _uses_shared_server(item, fixture)}
        if on_server - modules:
            raise pytest.UsageError(f"add {sorted(on_server - modules)} to SHARED_SERVERS[{fixture!r}] in tests/suite_split.py")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop the session's Ray after the last test that uses it: its processes keep about a tenth of a core busy
    while idle, which the rest of the suite would pay for (the ``ray_serve`` fixture's own stop is then a no-op)."""
    yield
    if "ray" not in sys.modules:
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # A worker of pytest-xdist runs what it is sent, in that order: its tests on Ray come as one group.
        last = _uses_ray(item) and (nextitem is None or not _uses_ray(nextitem))
    else:
        last = bool(_LAST_RAY_TEST) and item.nodeid == _LAST_RAY_TEST[0]
    if last:
        from conftest import _stop_ray

        _stop_ray()


# --- several processes: pytest -n auto (pytest-xdist) -------------------------------------------------


def _uses_shared_server(item, fixture: str) -> bool:
    """On the session's shared server ``fixture`` (tests/conftest.py or its plugin model_files.py), not a module's own
    fixture of that name; for ``server``, the ``local`` case of ``any_server`` too."""
    if fixture == "server" and _any_server_case(item) == "local":
        return True
    definitions = getattr(item, "_fixtureinfo", None) and item._fixtureinfo.name2fixturedefs.get(fixture)
    return bool(definitions) and definitions[-1].func.__module__ in ("conftest", "model_files")


#: The session's shared servers (fixtures of tests/conftest.py and model_files.py) and the modules with tests on each
#: (collection checks this against the fixtures): ``server``, the API's server, and ``options_server``, the one of what
#: a model is given at start (hub ids, LoRAs and aliases, a step cache, VAE tiling, compile).
SHARED_SERVERS = {
    "server": {
        "test_api_misc", "test_engine_behaviour", "test_load_bench", "test_openai_sdk", "test_playground",
        "test_probed_over_http", "test_raw_http", "test_reproducibility", "test_seed_examples",
        "test_shared_components_server", "test_streaming_variations",
    },
    "options_server": {
        "test_compile_server", "test_fuzz_server", "test_hub_models", "test_lora_server", "test_step_cache_server",
    },
}  # fmt: skip


def work_unit(nodeid: str) -> str:
    """What one worker runs as a whole: a module (its module-scoped servers start once), except that
    - every test on Ray is one unit, so that one worker starts one Ray. A test is on Ray when it is in test_ray.py or
      is the ``ray`` case of ``any_server`` (its id lists the value "ray");
    - the rest of the modules that use a shared server (``SHARED_SERVERS``) are one unit per server, named after
      its fixture, so that one worker starts that server (a session fixture: each worker would start its own);
    - the in-process modules that import Ray Serve are one unit (``RAY_IN_PROCESS_MODULES``).
    Collection checks the first two against the fixtures."""
    path, _, rest = nodeid.partition("::")
    params = rest.partition("[")[2].rstrip("]").split("-")
    if Path(path).name == "test_ray.py" or "ray" in params:
        return "ray"
    if Path(path).stem in RAY_IN_PROCESS_MODULES:
        return "ray-in-process"
    return next((fixture for fixture, modules in SHARED_SERVERS.items() if Path(path).stem in modules), path)


#: In-process modules that take seconds (the rest take a fraction of one): handed out before the quick rest, so that
#: one is never what a worker still runs while the other has nothing left (``-m "not e2e"`` ended 4 s later so).
LONG_IN_PROCESS_MODULES = {"test_fuzz"}
#: In-process modules that import Ray Serve, and most of them torch: one unit, taken as a long one, so that one test
#: process imports both (1.6 s and 2.5 s of CPU in each process that does) instead of each of them.
RAY_IN_PROCESS_MODULES = {
    "test_admission", "test_metrics", "test_plan_matches_serve", "test_ray_app", "test_ray_engine", "test_stuck_worker",
    "test_worker",
}  # fmt: skip


def _unit_rank(unit: str) -> int:
    """Which units a worker takes first: Ray's and the shared server's (the longest), then those that start servers
    or run pipelines, then the in-process modules that take seconds, then the quick rest, which fills both workers'
    ends evenly."""
    if unit in ("ray", "server"):
        return 0
    if unit in SHARED_SERVERS or _real_module(Path(unit)):
        return 1
    return 2 if unit == "ray-in-process" or Path(unit).stem in LONG_IN_PROCESS_MODULES else 3


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which a run without it lacks
def pytest_xdist_make_scheduler(config, log):
    """Hand out whole ``work_unit``s, longest kinds first (``_unit_rank``). (pytest-xdist's own ``--dist loadgroup``
    would read ``xdist_group`` marks from node ids that pytest 9 no longer lets a plugin change.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

        def schedule(self) -> None:
            if self.collection is None and self.collection_is_completed:
                self.config.option.loadscopereorder = False  # the queue keeps the order its units are put in:
                units = dict.fromkeys(work_unit(nodeid) for nodeid in next(iter(self.registered_collections.values())))
                for unit in sorted(units, key=_unit_rank):
                    self.workqueue[unit] = {}  # its place in the queue (the base class fills it)
            super().schedule()

    return ByWorkUnit(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """How many processes ``-n auto`` (scripts/test.sh's default) starts: one per core for the whole suite, whose
    servers and pipelines keep every core busy; one more with ``-m "not e2e"``, whose tests wait for a third of their
    time (timeouts, slow clients, retries), which the third process fills (38 s -> 35 s on a 2-core machine)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores + 1 if _deselects_e2e(config.option.markexpr) else cores


# --- a test process's exit -----------------------------------------------------------------------------------


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A pytest-xdist worker ends here, once its results are sent, without the interpreter's teardown: with torch,
    diffusers, transformers, Ray and the browser's driver loaded, tearing their modules down took one to several
    seconds of CPU in each of the two processes, at the very end of the run (measured on a 2-core machine). The
    atexit handlers still run (Ray's, torch's, temporary folders'), then the process leaves. The controlling
    process, which reports and sets the exit status, ends normally."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    from qwen_image_server.engine.forkserver_exit import exit_now

    atexit._run_exitfuncs()
    exit_now(0)


# --- the garbage collector -----------------------------------------------------------------------------------

#: How many modules were imported when the collector last froze what this process holds.
_frozen_at = [0]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before a test, once imports have grown this process by many modules (the first test that imports torch,
    diffusers and transformers, or Ray, adds hundreds of thousands of objects), move everything it holds out of the
    collector's reach (``gc.freeze``): each full collection went over all of those objects again, 0.2-0.3 s a pass,
    about 10 s of CPU in a run of ``-m "not e2e"`` (automatic passes and the tests' own ``gc.collect()``). What is
    frozen stays, as the imported modules do anyway; what tests make from then on is collected as before."""
    if len(sys.modules) > _frozen_at[0] + 100:
        import gc

        gc.freeze()
        _frozen_at[0] = len(sys.modules)
