#!/usr/bin/env bash
# The test command (README; CI's .ci/run runs exactly this). The web page's test drives a real
# Chromium and the scale-out tests a real Redis: Debian's packages are installed first if
# missing (as root, or through sudo); tests start their own redis-server, never a system one.
# Then a virtualenv with requirements-dev.txt; the pins, lint, format and strict types are
# checked; then pytest (arguments go to pytest; `-m "not e2e"` is the fast loop).
set -euo pipefail
cd "$(dirname "$0")"
missing=()
if [ -z "${ICS_CHROMIUM:-}" ] && ! command -v chromium >/dev/null; then missing+=(chromium); fi
if ! command -v redis-server >/dev/null; then missing+=(redis-server); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "run_tests.sh: installing Debian's ${missing[*]} for the tests" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian starts the packaged server as a service; the tests run their own.
  if command -v systemctl >/dev/null && systemctl is-active --quiet redis-server 2>/dev/null; then
    $sudo systemctl stop redis-server || true
  fi
fi
python3 tools/requirements.py --check
python3 -m venv .venv
.venv/bin/pip install -q -r requirements-dev.txt
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# First the few tests that cannot run under pytest-xdist, in this process (pytest's exit 5:
# the arguments selected none of them); then the rest on two processes (each test starts what
# it needs on free ports and in temp dirs; `ICS_TEST_PROCESSES` or a `-n N` among the arguments
# changes it).
status=0
.venv/bin/python -m pytest --serial-tests only "$@" -n 0 || status=$?
[ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"
exec .venv/bin/python -m pytest -n "${ICS_TEST_PROCESSES:-2}" --serial-tests skip "$@"
