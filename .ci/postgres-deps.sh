#!/usr/bin/env bash
# Debian's PostgreSQL server binaries for the real-server tests (tests/study/test_postgres.py, tests/pg_cluster.py).
# Idempotent: does nothing when initdb and pg_ctl are already under /usr/lib/postgresql/*/bin.
# Only the binaries are used: the package's own cluster is stopped; each test starts a
# throwaway one in a temporary folder, as the unprivileged `postgres` user the package creates.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" > /dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq postgresql
if command -v pg_ctlcluster > /dev/null; then
  for cluster in /etc/postgresql/*/main; do
    [ -d "$cluster" ] || continue
    version=$(basename "$(dirname "$cluster")")
    $SUDO pg_ctlcluster "$version" main stop || true  # not needed, and it would hold port 5432
  done
fi
ls /usr/lib/postgresql/*/bin/pg_ctl
