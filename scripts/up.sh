#!/usr/bin/env bash
# The one run command (README): install Soma Mesh into .venv and run the whole mesh locally.
# Arguments go to `soma-mesh up` (e.g. --replicas 2 --port 8080 --data-dir ./.soma).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e .
exec soma-mesh up "$@"
