#!/usr/bin/env bash
# The project's test command, as README.md documents it (and as .ci/run runs it):
# make a virtual environment, install the package with its test extras, check
# formatting, lint and types (ruff format --check, ruff check, mypy; any finding
# fails the run), then run pytest.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh tests/unit -x   # arguments go to pytest
#   scripts/test.sh -m "not e2e"    # without the tests that start a server
#
# VENV (default .venv) picks the environment; an existing one is reused. torch is
# installed only if the environment has none: pin 2.13.0 (CPU wheel on a CPU box).
# For a GPU build, install torch for your CUDA into the environment first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -c 'import torch' 2>/dev/null || pip install torch==2.13.0
pip install -e '.[test]'

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

# The same checks as .pre-commit-config.yaml; configured in pyproject.toml.
LINTED=(src tests bench scripts)
echo "ruff format --check ${LINTED[*]}"
ruff format --check "${LINTED[@]}"
echo "ruff check ${LINTED[*]}"
ruff check "${LINTED[@]}"
echo "mypy (src)"
mypy

python -m pytest -q "$@"
