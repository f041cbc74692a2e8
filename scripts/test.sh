#!/usr/bin/env bash
# The project's test command, as README.md documents it (and as .ci/run runs it):
# make a virtual environment, install the package with its test extras, check
# formatting and lint (ruff format --check, ruff check), then run pytest in one
# process per core (pytest-xdist; one more with -m "not e2e") while mypy checks the
# types beside it. Any finding or failure fails the run.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh tests/unit -x   # arguments go to pytest
#   scripts/test.sh -m "not e2e"    # without the tests that start a server
#   scripts/test.sh -n 0            # pytest in one process (TEST_WORKERS=N: N processes; default: one per core,
#                                   # one more with -m "not e2e": tests/suite_split.py)
#
# VENV (default .venv) picks the environment; an existing one is reused (and pip skipped when nothing changed). torch is
# installed only if the environment has none: pin 2.13.0 (CPU wheel on a CPU box).
# For a GPU build, install torch for your CUDA into the environment first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# Whether torch is installed, asked without importing it (an import costs seconds of CPU before anything runs).
python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' || pip install torch==2.13.0
# pip runs when pyproject.toml changed since this environment last installed this checkout (its hash is kept in the
# environment) or the environment's package is another checkout's: a rerun then skips pip's 5-10 s of resolving.
STAMP="$VENV/.qwen-image-server-test-install"
WANT="$(pwd) $(sha256sum pyproject.toml | cut -d' ' -f1)"
HAVE="$(python -c 'import qwen_image_server, pathlib; print(pathlib.Path(qwen_image_server.__file__).parents[2])' 2>/dev/null || true)"
if [ "$HAVE" != "$(pwd)" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    pip install -e '.[test]'
    echo "$WANT" >"$STAMP"
fi

# The browser tests (tests/e2e/test_playground.py) drive the system's Chromium through
# Playwright (from the test extra; it never downloads browsers). Install it when it is
# missing and this script may (root with apt-get); otherwise those tests are skipped,
# or fail under CI.
if [ -z "${QIS_CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "test.sh: installing chromium for the browser tests: apt-get install -y --no-install-recommends chromium"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }; then
            echo "test.sh: could not install chromium; the browser tests will be skipped (they fail under CI)"
        fi
    else
        echo "test.sh: no /usr/bin/chromium and no way to install it here (needs root and apt-get);" \
            "the browser tests will be skipped (they fail under CI). Set QIS_CHROMIUM to a Chromium binary to run them."
    fi
fi

# Compiled modules are kept (in __pycache__, ignored by git) even where PYTHONDONTWRITEBYTECODE is set: without them
# every process compiles the server's modules again (each server the tests start: its API process, its forkserver),
# and pytest, which keeps its assertion-rewritten test modules only where bytecode may be written, rewrites every
# test module in each of its processes again (3 s of the 6 s a process takes to collect -m "not e2e").
unset PYTHONDONTWRITEBYTECODE

# The same checks as .pre-commit-config.yaml; configured in pyproject.toml.
LINTED=(src tests bench scripts)
echo "ruff format --check ${LINTED[*]}"
ruff format --check "${LINTED[@]}"
echo "ruff check ${LINTED[*]}"
ruff check "${LINTED[@]}"
# mypy (one thread; about 13 s without its cache, as in a fresh clone) runs beside pytest instead of before it,
# in the moments pytest's processes leave a core idle (start-up, waits on servers and timeouts). Its report comes
# after pytest's. (--pdb and other options that need one process: pass -n 0 too.)
MYPY_LOG="$(mktemp)"
mypy >"$MYPY_LOG" 2>&1 &
MYPY_PID=$!
trap 'kill "$MYPY_PID" 2>/dev/null || true; rm -f "$MYPY_LOG"' EXIT

pytest_status=0
python -m pytest -q -n "${TEST_WORKERS:-auto}" "$@" || pytest_status=$?

mypy_status=0
wait "$MYPY_PID" || mypy_status=$?
echo "mypy (src):"
cat "$MYPY_LOG"
if [ "$mypy_status" != 0 ]; then
    echo "test.sh: mypy found errors (exit $mypy_status)"
    exit 1
fi
exit "$pytest_status"
