#!/usr/bin/env bash
# Installs everything mcim builds, tests and runs with on a fresh Debian 12 machine:
# system packages from apt-get and the `buf` linter from npm (into .tools/, not global).
# Idempotent; runs as root or through sudo. The Rust toolchain (cargo, rustc, cargo-nextest)
# is expected on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
  pkg-config
  protobuf-compiler libprotobuf-dev   # protoc and the well-known types, for mcim-proto
  libtss2-dev                         # tpm2-tss, for tss-esapi (TPM TRE)
  swtpm swtpm-tools                   # software TPM for TRE and flow tests
  tpm2-tools                          # independent witness of what the TPM holds
  softhsm2 opensc                     # PKCS#11 token for tests, and pkcs11-tool as witness
  procps                              # kill(1): tests and `mcimctl lab` stop tred with SIGTERM
  dpkg-dev man-db                     # ci/packages.sh: cargo-deb's dpkg-shlibdeps; `man mcimctl`
  qemu-system-x86 qemu-utils debootstrap e2fsprogs  # ci/guest.sh: the device as a Linux guest
  libosmocore-utils                   # osmo-auc-gen: AKA vectors the USIM tests check against
  python3                             # /usr/bin/python3: the USIM tests' client run as other uids
  pcscd vsmartcard-vpcd python3-pyscard pcsc-tools  # the USIM as a PC/SC card: pcscd with vpcd
                                      # (tests and the lab start private ones), pyscard clients
  libpcsclite-dev                     # the pcsc crate (mcimctl card) links libpcsclite
  util-linux                          # unshare: a private pcscd in a mount namespace; setpriv
  postgresql                          # the roles on PostgreSQL: tests start throwaway clusters
  iproute2                            # ip netns, veth, bridge: tests/tests/netns.rs's hosts
  ca-certificates
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "ci/install-deps: installing ${missing[*]}"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# npm installs buf. Machines that carry Node.js from another source already have npm; the
# Debian packages would conflict with it, so they are only installed when npm is absent.
if ! command -v npm >/dev/null; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

# buf, pinned, for `buf lint` of proto/ (STANDARD rules).
BUF_VERSION=1.75.0
if [ ! -x .tools/buf/node_modules/.bin/buf ] || \
   [ "$(.tools/buf/node_modules/.bin/buf --version 2>/dev/null)" != "$BUF_VERSION" ]; then
  mkdir -p .tools/buf
  (cd .tools/buf && npm install --no-save --no-audit --no-fund --loglevel=error "@bufbuild/buf@$BUF_VERSION" >/dev/null)
fi

command -v cargo >/dev/null || { echo "ci/install-deps: cargo not found (install Rust with rustup)" >&2; exit 1; }

# cargo-deb, pinned, for the Debian packages (ci/packages.sh), into .tools/ (not global).
CARGO_DEB_VERSION=3.8.0
if [ "$(.tools/cargo-deb/bin/cargo-deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
  cargo install --quiet --locked --root .tools/cargo-deb "cargo-deb@$CARGO_DEB_VERSION"
fi
echo "ci/install-deps: ok ($(protoc --version), buf $(.tools/buf/node_modules/.bin/buf --version), $(swtpm --version | head -1), $(.tools/cargo-deb/bin/cargo-deb --version))"
