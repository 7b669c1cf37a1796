#!/usr/bin/env bash
# One-command set-up for a fresh machine.
#   bash scripts/setup.sh test   install everything, then run the test suite
#   bash scripts/setup.sh demo   install everything, then run the local demo swarm
# On the project's CPU machines `torch==2.13.0` is a local CPU build; elsewhere set
# SWARM_TORCH_SPEC (e.g. "torch" for the default CUDA build) before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"
PY="${PYTHON:-python3}"

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  missing=""
  command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
  command -v tc >/dev/null 2>&1 || missing="$missing iproute2"
  if [ "$what" = "test" ]; then
    command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
    # tests/integration/foundation/test_docker_compose_config.py runs `docker-compose config` with it
    command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
  fi
  if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing" >&2
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null 2>&1 \
      || echo "setup: could not install$missing; tests that need them will be skipped" >&2
  fi
fi

"$PY" -m pip install -q --disable-pip-version-check "${SWARM_TORCH_SPEC:-torch==2.13.0}"
"$PY" -m pip install -q --disable-pip-version-check -e '.[test]'

case "$what" in
  test)
    "$PY" scripts/gen_protos.py --check
    exec "$PY" -m pytest -q --durations=30 tests
    ;;
  demo)
    # the module, not the `swarm` script: with PYTHON=/venv/bin/python the venv is not on PATH,
    # and a bare `swarm` would find the ./swarm package directory
    exec "$PY" -m swarm.cli local demo
    ;;
  *)
    echo "usage: bash scripts/setup.sh test|demo" >&2
    exit 2
    ;;
esac
