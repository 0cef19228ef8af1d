#!/usr/bin/env bash
# Start a local PostgreSQL for the distributed-sweep test (Debian's package; installed when missing) and
# print the URL the tests read from TUNELAB_TEST_POSTGRES_URL. Used by .ci/run; safe to run twice.
set -euo pipefail
if ! command -v pg_lsclusters >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
cluster=$(pg_lsclusters --no-header | head -1)
version=$(echo "$cluster" | awk '{print $1}')
name=$(echo "$cluster" | awk '{print $2}')
port=$(echo "$cluster" | awk '{print $3}')
pg_ctlcluster "$version" "$name" start >/dev/null 2>&1 || true  # "already running" is fine
for _ in $(seq 30); do pg_isready -q -p "$port" && break; sleep 1; done
su postgres -c "psql -q -p $port -tc \"SELECT 1 FROM pg_roles WHERE rolname='tunelab'\" | grep -q 1 ||
                psql -q -p $port -c \"CREATE ROLE tunelab LOGIN PASSWORD 'tunelab'\"" >/dev/null
su postgres -c "psql -q -p $port -tc \"SELECT 1 FROM pg_database WHERE datname='tunelab_test'\" | grep -q 1 ||
                createdb -p $port -O tunelab tunelab_test" >/dev/null
echo "postgresql://tunelab:tunelab@localhost:$port/tunelab_test"
