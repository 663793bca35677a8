#!/usr/bin/env bash
# The test command (README; CI's .ci/run runs exactly this). The web page's test drives a real
# Chromium: Debian's package is installed first if there is none (as root, or through sudo).
# Then a virtualenv with requirements-dev.txt; the pins, lint, format and strict types are
# checked; then pytest (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${ICS_CHROMIUM:-}" ] && ! command -v chromium >/dev/null; then
  echo "run_tests.sh: installing Debian's chromium for tests/test_page.py" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
python3 tools/requirements.py --check
python3 -m venv .venv
.venv/bin/pip install -q -r requirements-dev.txt
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
