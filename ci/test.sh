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

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  # Doc tests first: nextest's summary is then the closing line.
  cargo test --workspace --locked --doc
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi

echo "== Debian packages: build, dpkg -i, the installed commands, remove, purge"
bash ci/packages.sh

echo "== the device for real: a qemu guest with a kernel TPM, the packages and their units"
if [ "$(id -u)" -eq 0 ]; then bash ci/guest.sh; else sudo bash ci/guest.sh; fi
