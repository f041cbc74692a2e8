"""How ``scripts/test.sh`` splits the suite over its pytest processes (``tests/suite_split.py``)."""

from __future__ import annotations

from suite_split import _deselects_e2e, _unit_rank, pytest_xdist_auto_num_workers, work_unit


def test_a_module_is_one_unit_and_every_test_on_ray_and_on_the_shared_server_is_one_unit():
    assert work_unit("tests/unit/test_jobs.py::test_sizes") == "tests/unit/test_jobs.py"
    assert work_unit("tests/unit/test_jobs.py::test_bad_sizes[fields0-size]") == "tests/unit/test_jobs.py"
    assert work_unit("tests/e2e/test_openai_sdk.py::test_unknown_model_through_the_sdk[local]") == "server"
    assert work_unit("tests/e2e/test_seed_examples.py::test_seed_000_generation") == "server"
    # a module that starts its own server stays its own unit; the modules on another shared server are that one's
    assert work_unit("tests/e2e/test_keyed_server.py::test_metrics_need_a_key") == "tests/e2e/test_keyed_server.py"
    assert work_unit("tests/e2e/test_lora_server.py::test_models_list_the_lora_ids") == "options_server"
    assert work_unit("tests/e2e/test_step_cache_server.py::test_cache_flag_request_field_and_stats") == "options_server"
    assert work_unit("tests/e2e/test_openai_sdk.py::test_unknown_model_through_the_sdk[ray]") == "ray"
    assert work_unit("tests/e2e/test_openai_sdk.py::test_output_format_and_size[ray-png-PNG-256x256]") == "ray"
    assert work_unit("tests/e2e/test_streaming_variations.py::test_edit_stream[ray]") == "ray"
    assert work_unit("tests/e2e/test_ray.py::test_full_queue_gives_503") == "ray"
    # "ray" inside a longer parameter or a name is not Ray's case
    assert work_unit("tests/unit/test_jobs.py::test_the_ray_engine_names_a_replicas_out_of_memory_the_same_way") == (
        "tests/unit/test_jobs.py"
    )
    assert work_unit("tests/unit/test_x.py::test_y[array-2]") == "tests/unit/test_x.py"
    # the in-process modules that import Ray Serve, together
    assert work_unit("tests/unit/test_ray_app.py::test_x") == work_unit("tests/unit/test_metrics.py::test_y") == "ray-in-process"


def test_ray_and_the_shared_server_go_first_then_servers_and_pipelines_then_long_in_process_modules_then_the_rest():
    units = [
        "tests/unit/test_jobs.py",
        "tests/unit/test_fuzz.py",
        "tests/unit/test_random_arch.py",
        "server",
        "options_server",
        "tests/e2e/test_recovery.py",
        "ray",
        "ray-in-process",
    ]
    assert sorted(units, key=_unit_rank) == [
        "server",
        "ray",
        "tests/unit/test_random_arch.py",
        "options_server",
        "tests/e2e/test_recovery.py",
        "tests/unit/test_fuzz.py",
        "ray-in-process",
        "tests/unit/test_jobs.py",
    ]


def test_each_module_listed_in_the_split_exists():
    """Collection checks that every test on a shared server is in a listed module; a listed name that no longer
    exists (a renamed module) would leave its tests out of the list, or a long module among the quick ones."""
    from pathlib import Path

    from suite_split import LONG_IN_PROCESS_MODULES, RAY_IN_PROCESS_MODULES, SHARED_SERVERS

    tests = Path(__file__).resolve().parents[1]
    listed = set().union(*SHARED_SERVERS.values(), LONG_IN_PROCESS_MODULES, RAY_IN_PROCESS_MODULES)
    assert {stem for stem in listed if not list(tests.rglob(f"{stem}.py"))} == set()


def test_a_mark_expression_that_drops_every_e2e_test_skips_importing_the_e2e_modules():
    """``-m`` expressions under which no test marked ``e2e`` can run, whatever its other marks (its modules are then
    not imported), and those under which some can."""
    for markexpr in ("not e2e", "not e2e and not slow", "unit and not e2e", "not (e2e or slow)"):
        assert _deselects_e2e(markexpr), markexpr
    for markexpr in (
        "",
        "e2e",
        "slow",
        "not e2e or slow",
        "not (e2e and slow)",
        "e2e and a and not b",
        "not e2e and m(x=1)",
        "not e2e and (",
        "not e2e_slow",
    ):
        assert not _deselects_e2e(markexpr), markexpr


def test_auto_starts_a_process_per_core_and_one_more_without_the_e2e_tests(monkeypatch):
    import os
    from types import SimpleNamespace

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)

    def workers(markexpr: str) -> int:
        return pytest_xdist_auto_num_workers(SimpleNamespace(option=SimpleNamespace(markexpr=markexpr)))

    assert workers("") == workers("e2e") == workers("not gpu") == 2
    assert workers("not e2e") == workers("not e2e and not gpu") == 3
