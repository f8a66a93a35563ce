#!/usr/bin/env bash
# The device for real: boots a minimal Debian guest under qemu (software emulation) whose
# TPM 2.0 is swtpm behind qemu's tpm-crb device, so that the guest's kernel exposes it as
# /dev/tpmrm0; ci/guest/run.sh then runs inside: the Debian packages installed with dpkg -i,
# mcim-roles@all and tred started by their units, a device supplied, contracted, provisioned
# and attached over the guest's own loopback (the guest has no network card), and no error in
# any unit's journal. The host reads the outcome from the serial console.
#
#   bash ci/guest.sh                      # builds the packages first if target/debian has none
#   MCIM_GUEST_TRED_DROPIN=FILE bash ci/guest.sh   # tred's unit with a drop-in (a negative check:
#                                         # with PrivateNetwork=yes the run must fail)
#   MCIM_GUEST_ACCEL=kvm bash ci/guest.sh # hardware virtualisation where /dev/kvm works
#
# The guest's root file system (debootstrap of Debian 12 with its kernel) is cached in
# target/guest/, keyed by what goes into it; a cached run skips debootstrap. Run as root
# (debootstrap needs it). Where qemu or debootstrap is missing or the guest cannot boot, this
# fails: it never passes without having run the device.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."

SUITE=bookworm
MIRROR="${MCIM_GUEST_MIRROR:-http://deb.debian.org/debian}"
ACCEL="${MCIM_GUEST_ACCEL:-tcg}"
TIMEOUT="${MCIM_GUEST_TIMEOUT:-1500}"
# What the packages depend on (dpkg -i installs no dependencies), and tpm2-tools as witness.
INCLUDE=systemd-sysv,udev,linux-image-amd64,initramfs-tools,tpm-udev,adduser,passwd,\
libtss2-esys-3.0.2-0,libtss2-tctildr0,libtss2-mu0,libpcsclite1,tpm2-tools,iproute2,procps,util-linux

fail() { echo "ci/guest: FAIL: $*" >&2; exit 1; }
for tool in qemu-system-x86_64 qemu-img debootstrap swtpm mkfs.ext4; do
  command -v "$tool" >/dev/null || fail "$tool is missing (ci/install-deps.sh installs it)"
done
[ "$(id -u)" -eq 0 ] || fail "run as root (debootstrap and chroot need it)"
ls target/debian/mcim-tred_*.deb >/dev/null 2>&1 || bash ci/packages.sh --build

cache="$PWD/target/guest"
key=$(printf '%s\n' "$SUITE" "$INCLUDE" "$(sed -n '/^base_setup()/,/^}/p' "$self")" | sha256sum | cut -c1-16)
base="$cache/base-$key"
mkdir -p "$cache"

# The guest's base system: Debian with its kernel, a unit that runs the second disk's run.sh
# at boot and powers off after it, nothing that waits for a network.
base_setup() {
  local root="$1"
  echo mcim-guest >"$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 mcim-guest\n' >"$root/etc/hosts"
  echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$root/etc/fstab"
  cat >"$root/etc/systemd/system/mcim-guest.service" <<'EOF'
[Unit]
Description=mcim guest test (ci/guest/run.sh from the second disk)
After=local-fs.target systemd-udev-settle.service
Wants=systemd-udev-settle.service
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'mkdir -p /run/mcim-guest && mount -o ro /dev/vdb /run/mcim-guest && exec /bin/sh /run/mcim-guest/run.sh'
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
EOF
  ln -sf /etc/systemd/system/mcim-guest.service \
    "$root/etc/systemd/system/multi-user.target.wants/mcim-guest.service"
  # Nothing that would wait for, or fetch from, a network the guest does not have.
  for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
              systemd-networkd-wait-online.service serial-getty@ttyS0.service getty@tty1.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
  done
}

if [ ! -f "$base/.done" ]; then
  echo "== debootstrap $SUITE into $base (cached for the next run)"
  rm -rf "$base" "$base.tmp"
  start=$(date +%s)
  debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$base.tmp/root" "$MIRROR" \
    >"$cache/debootstrap.log" 2>&1 || { tail -20 "$cache/debootstrap.log"; fail "debootstrap"; }
  base_setup "$base.tmp/root"
  rm -rf "$base.tmp/root/var/cache/apt/archives"/*.deb
  cp "$base.tmp"/root/boot/vmlinuz-* "$base.tmp/vmlinuz"
  cp "$base.tmp"/root/boot/initrd.img-* "$base.tmp/initrd.img"
  mkfs.ext4 -q -F -L mcim-guest -d "$base.tmp/root" "$base.tmp/root.img" 3G >/dev/null
  rm -rf "$base.tmp/root"
  mv "$base.tmp" "$base"
  touch "$base/.done"
  echo "== base image made in $(( $(date +%s) - start )) s"
  # Older bases are stale.
  find "$cache" -maxdepth 1 -name 'base-*' ! -name "base-$key" -exec rm -rf {} +
fi

work=$(mktemp -d "$cache/run.XXXXXX")
swtpm_pid=""
cleanup() {
  [ -n "$swtpm_pid" ] && kill "$swtpm_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# This run's disk: a copy-on-write layer over the cached base, which stays pristine.
qemu-img create -q -f qcow2 -b "$(realpath "$base/root.img")" -F raw "$work/root.qcow2"
# The second disk: the packages and the script.
mkdir "$work/in"
cp target/debian/mcim-tred_*.deb target/debian/mcim-roles_*.deb target/debian/mcimctl_*.deb \
  ci/guest/run.sh "$work/in/"
if [ -n "${MCIM_GUEST_TRED_DROPIN:-}" ]; then
  cp "$MCIM_GUEST_TRED_DROPIN" "$work/in/tred-dropin.conf"
fi
mkfs.ext4 -q -F -d "$work/in" "$work/in.img" 256M >/dev/null

# The TPM: swtpm, fresh for this run, on a control socket qemu's tpm-emulator speaks.
mkdir "$work/tpm"
swtpm socket --tpm2 --tpmstate dir="$work/tpm" --ctrl type=unixio,path="$work/swtpm.sock" \
  --log file="$work/swtpm.log" &
swtpm_pid=$!
for _ in $(seq 50); do [ -S "$work/swtpm.sock" ] && break; sleep 0.1; done
[ -S "$work/swtpm.sock" ] || fail "swtpm did not start: $(cat "$work/swtpm.log")"

echo "== booting the guest (qemu, accel=$ACCEL; up to $TIMEOUT s)"
start=$(date +%s)
status=0
timeout "$TIMEOUT" qemu-system-x86_64 \
  -machine q35 -accel "$ACCEL" -m 2048 -smp 2 \
  -display none -monitor none -no-reboot -nic none \
  -serial file:"$work/serial.log" \
  -kernel "$base/vmlinuz" -initrd "$base/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0 quiet panic=-1 systemd.show_status=0" \
  -drive file="$work/root.qcow2",if=virtio,format=qcow2 \
  -drive file="$work/in.img",if=virtio,format=raw \
  -chardev socket,id=chrtpm,path="$work/swtpm.sock" \
  -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-crb,tpmdev=tpm0 \
  || status=$?
took=$(( $(date +%s) - start ))
cp "$work/serial.log" "$cache/last-serial.log"
grep -a 'MCIM-GUEST' "$work/serial.log" || true
[ "$status" -ne 124 ] || fail "the guest did not finish in $TIMEOUT s (serial: $cache/last-serial.log)"
[ "$status" -eq 0 ] || fail "qemu exited with $status (serial: $cache/last-serial.log)"
if ! grep -aq '^MCIM-GUEST-RESULT: ok' "$work/serial.log"; then
  grep -a -A80 'MCIM-GUEST-RESULT: FAIL' "$work/serial.log" | tail -n 80 || tail -n 60 "$work/serial.log"
  fail "the device did not come up in the guest (serial: $cache/last-serial.log)"
fi
echo "ci/guest: ok (guest booted, packages installed, device provisioned and attached in $took s)"
