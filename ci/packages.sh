#!/usr/bin/env bash
# The Debian packages: builds mcim-tred, mcim-roles and mcimctl with cargo-deb (release
# binaries, man pages and shell completions generated from the clap commands), then checks
# them on this machine as root: `dpkg -i`, the installed commands and man page answer, the
# users, groups, units and completions are in place; `dpkg -r` keeps users and state; `dpkg -P`
# removes them. Run ci/install-deps.sh first (it installs cargo-deb into .tools/).
#
#   bash ci/packages.sh            # build and check
#   bash ci/packages.sh --build    # build only: the packages in target/debian/
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export PATH="$PWD/.tools/cargo-deb/bin:$PATH"
command -v cargo-deb >/dev/null || { echo "ci/packages: cargo-deb missing: run ci/install-deps.sh" >&2; exit 1; }

echo "== release binaries"
cargo build --release --locked --bins -p mcim-tre -p mcim-roles -p mcimctl

echo "== man pages and completions"
assets=target/release/package-assets
rm -rf "$assets"
mkdir -p "$assets/man1" "$assets/man8" "$assets/completions"
target/release/mcimctl man --out-dir "$assets/man1"
target/release/tred --generate-man "$assets/man8"
target/release/mcim-roles man --out-dir "$assets/man8"
gzip -9n "$assets"/man1/*.1 "$assets"/man8/*.8
target/release/mcimctl completions bash >"$assets/completions/mcimctl.bash"
target/release/mcimctl completions zsh >"$assets/completions/_mcimctl"
target/release/mcimctl completions fish >"$assets/completions/mcimctl.fish"

echo "== cargo deb"
rm -rf target/debian
for crate in mcim-tre mcim-roles mcimctl; do
  cargo deb --no-build --locked --fast --dbgsym -p "$crate" --output target/debian/ >/dev/null
done
ls -l target/debian/
[ "${1:-}" = "--build" ] && exit 0

echo "== install, remove, purge on this machine"
fail() { echo "ci/packages: FAIL: $*" >&2; exit 1; }
for pkg in mcim-tred mcim-roles mcimctl; do
  if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q installed; then
    fail "$pkg is already installed here; this check installs and purges it (dpkg -P $pkg first)"
  fi
done
$SUDO dpkg -i target/debian/mcim-tred_*.deb target/debian/mcim-roles_*.deb target/debian/mcimctl_*.deb

/usr/bin/mcimctl --version | grep -q '^mcimctl ' || fail "mcimctl --version"
/usr/bin/tred --version | grep -q '^tred ' || fail "tred --version"
/usr/bin/mcim-roles --help | grep -q 'supplier' || fail "mcim-roles --help"
man -P cat mcimctl 2>/dev/null | grep -q 'mcimctl-device' || fail "man mcimctl"
man -P cat 8 tred 2>/dev/null | grep -q 'MCIM_STATE_DIR' || fail "man 8 tred"
man -P cat mcim-roles-sho 2>/dev/null | grep -q 'sho-plmn' || fail "man mcim-roles-sho"
for f in /usr/lib/systemd/system/tred.service /usr/lib/systemd/system/mcim-roles@.service \
         /etc/mcim/tred.toml /etc/mcim/mcim-roles.toml /usr/share/zsh/vendor-completions/_mcimctl \
         /usr/share/fish/vendor_completions.d/mcimctl.fish; do
  [ -f "$f" ] || fail "$f not installed"
done
[ "$(stat -c %G /etc/mcim/pki)" = mcim-roles ] || fail "/etc/mcim/pki is not the roles' group's"
id -nG tred | tr ' ' '\n' | grep -qx mcim || fail "tred is not in mcim"
id -nG tred | tr ' ' '\n' | grep -qx tss || fail "tred is not in tss (the TPM's group)"
for g in mcim-owner mcim-modem mcim-audit mcim-roles; do getent group "$g" >/dev/null || fail "no group $g"; done
# The bash completion script loads and completes `mcimctl dev<TAB>` to `device`.
completed=$(bash -c 'source /usr/share/bash-completion/completions/mcimctl
  COMP_WORDS=(mcimctl dev); COMP_CWORD=1; COMP_LINE="mcimctl dev"; COMP_POINT=${#COMP_LINE}
  _mcimctl mcimctl dev mcimctl; printf "%s\n" "${COMPREPLY[@]}"')
[ "$completed" = device ] || fail "mcimctl dev<TAB> completed to: $completed"
# The shipped unit files parse (where systemd is installed; it need not run).
if command -v systemd-analyze >/dev/null; then
  for u in tred.service mcim-roles@all.service; do
    out=$(systemd-analyze verify --man=no "$u" 2>&1 || true)
    if echo "$out" | grep -iE 'unknown|invalid|failed to parse|ignoring' | grep -v 'Failed to prepare filename\|tpm2.target\|dev-tpmrm0'; then
      fail "systemd-analyze verify $u"
    fi
  done
fi

# State the daemons would have made, to see what remove keeps and purge removes.
$SUDO install -d -o tred -m 0700 /var/lib/mcim/tred
$SUDO install -d -o mcim-roles -m 0750 /var/lib/mcim/roles
$SUDO touch /var/lib/mcim/tred/registry.json /var/lib/mcim/roles/ro.db

$SUDO dpkg -r mcimctl mcim-roles mcim-tred
[ ! -e /usr/bin/tred ] || fail "tred still installed after dpkg -r"
getent passwd tred >/dev/null || fail "dpkg -r removed the user tred"
getent passwd mcim-roles >/dev/null || fail "dpkg -r removed the user mcim-roles"
[ -f /var/lib/mcim/tred/registry.json ] || fail "dpkg -r removed tred's state"
[ -f /var/lib/mcim/roles/ro.db ] || fail "dpkg -r removed the roles' state"
[ -f /etc/mcim/tred.toml ] || fail "dpkg -r removed the configuration (a conffile)"

$SUDO dpkg -P mcimctl mcim-roles mcim-tred
for u in tred mcim-roles; do ! getent passwd "$u" >/dev/null || fail "user $u left after purge"; done
for g in mcim mcim-owner mcim-modem mcim-audit mcim-roles; do
  ! getent group "$g" >/dev/null || fail "group $g left after purge"
done
[ ! -e /var/lib/mcim ] || fail "/var/lib/mcim left after purge: $(ls -R /var/lib/mcim)"
[ ! -e /etc/mcim ] || fail "/etc/mcim left after purge: $(ls -R /etc/mcim)"
[ ! -e /usr/lib/systemd/system/tred.service ] || fail "tred.service left after purge"
echo "ci/packages: ok (built, installed, answered, removed, purged)"
