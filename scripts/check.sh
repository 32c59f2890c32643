#!/usr/bin/env bash
# The one test command (README, and .ci/run calls exactly this): installs the project with its
# dev tools into .venv, then runs lint, contract checks, gen freshness, unit and integration
# tests. Integration tests start a real mesh (pgserver, NATS, OpenBao, Envoy, services, worker)
# on free loopback ports, so nothing needs to be running beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi

step() { printf '\n== %s\n' "$*"; }

step "install (pip install -e '.[dev]')"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e '.[dev]'

step "promtool (Debian's prometheus package) for the alert-rule tests"
if ! command -v promtool >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y --no-install-recommends prometheus >/dev/null; }
  else
    echo "promtool is missing: install Debian's prometheus package (the rule tests need it)" >&2
  fi
fi

step "ruff"
ruff check .
ruff format --check .

step "mypy (hand-written code)"
mypy

step "contract: buf lint, gen/ freshness, buf breaking against the previous commit"
python scripts/gen.py --check --breaking

step "tests (unit, then integration against a real local mesh)"
set +e
python -m pytest -p no:cacheprovider "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
  echo "pytest collected no tests: that is a broken test suite, not a pass" >&2
  exit 1
fi
exit $status
