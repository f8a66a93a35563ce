#!/usr/bin/env bash
# Every check CI runs: format, clippy with warnings denied, buf lint of the wire contract,
# all tests (unit, integration, end-to-end, doc), the Debian packages (ci/packages.sh) and
# the guest that installs and runs them (ci/guest.sh).
# Run ci/install-deps.sh once first.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== buf lint (STANDARD)"
.tools/buf/node_modules/.bin/buf lint

echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== each TRE backend alone: tre-daemon and its tests with only the tpm feature, then only pkcs11"
for backend in tpm pkcs11; do
  cargo clippy -p mcim-tre --all-targets --locked --no-default-features --features "$backend" -- -D warnings
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run -p mcim-tre --locked --no-default-features --features "$backend" --no-fail-fast
  else
    cargo test -p mcim-tre --locked --no-default-features --features "$backend" --no-fail-fast
  fi
done

echo "== build every binary (end-to-end tests start tred, mcimctl and mcim-roles)"
cargo build --workspace --bins --locked

echo "== a throwaway PostgreSQL cluster (stopped when this script exits)"
# shellcheck source=ci/postgres.sh
source ci/postgres.sh
# The tests that run the roles on PostgreSQL too: the store's unit tests and the end-to-end
# suites that reach the database only through the roles (or through mcim_e2e's engine-neutral
# helpers: `Roles`, `LabDbs`, `db_rows`, `dump`). The others need no database of their own
# choosing (docs, readme, local_api, tracing), exercise the USIM's card path (usim), or start
# a PostgreSQL of their own (netns).
PG_SUITES=(provisioning authz subscriber dpf ccif discard metrics overload resume device roles postgres fleet change instruction renewal cli_flow)
PG_TESTS=(-p mcim-roles -p mcim-e2e)
PG_FILTER="package(mcim-roles)"
for t in "${PG_SUITES[@]}"; do
  PG_TESTS+=(--test "$t")
  PG_FILTER+=" | (package(mcim-e2e) & binary($t))"
done

# tests/tests/netns.rs makes network namespaces, which takes root: without it the test says
# SKIPPED (and why) instead of failing.
if [ "$(id -u)" -ne 0 ]; then
  export MCIM_NETNS_OPTIONAL=1
  echo "ci/test: not root: tests/tests/netns.rs will print SKIPPED (network namespaces need root)"
fi

echo "== tests (SQLite; tests/tests/postgres.rs on the cluster above)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo test --workspace --locked --doc
  # Every test on SQLite, except those that are about PostgreSQL.
  env -u MCIM_TEST_POSTGRES cargo nextest run --workspace --locked --no-fail-fast
  echo "== the same roles tests on PostgreSQL"
  # --workspace with a filter: the same build as above (a -p selection would rebuild with
  # other features).
  cargo nextest run --workspace --locked --no-fail-fast -E "$PG_FILTER"
else
  env -u MCIM_TEST_POSTGRES cargo test --workspace --locked --no-fail-fast
  cargo test --locked --no-fail-fast "${PG_TESTS[@]}"
fi

echo "== Debian packages: build, dpkg -i, the installed commands, remove, purge"
bash ci/packages.sh

echo "== the device for real: a qemu guest with a kernel TPM, the packages and their units"
if [ "$(id -u)" -eq 0 ]; then bash ci/guest.sh; else sudo bash ci/guest.sh; fi
