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

# The same checks as .pre-commit-config.yaml; configured in pyproject.toml.
LINTED=(src tests bench scripts)
echo "ruff format --check ${LINTED[*]}"
ruff format --check "${LINTED[@]}"
echo "ruff check ${LINTED[*]}"
ruff check "${LINTED[@]}"
echo "mypy (src)"
mypy

python -m pytest -q "$@"
