#!/bin/sh
# Runs inside the guest that ci/guest.sh boots (from its second disk, mounted at
# /run/mcim-guest): the packages installed with dpkg -i, the roles and tred started by their
# units, tred on the kernel's /dev/tpmrm0, a device supplied, contracted, provisioned and
# attached over the guest's own loopback, local callers decided by their groups, and no error
# in any unit's journal. Prints "MCIM-GUEST: ..." progress lines and, last,
# "MCIM-GUEST-RESULT: ok" or "MCIM-GUEST-RESULT: FAIL ..." on the serial console, which the
# host reads.
set -eu
in=/run/mcim-guest
step() { echo "MCIM-GUEST: $*"; }
fail() {
    echo "MCIM-GUEST-RESULT: FAIL $*"
    journalctl --no-pager -o short-monotonic -u tred -u 'mcim-roles@*' | tail -n 60 || true
    exit 1
}
trap 'status=$?; [ $status -eq 0 ] || fail "a command failed (exit $status) after: $last"' EXIT
last="start"
run() { last="$*"; "$@"; }

step "kernel $(uname -r); TPM: $(ls /dev/tpm* 2>/dev/null | tr '\n' ' ')"
[ -c /dev/tpmrm0 ] || fail "no /dev/tpmrm0: the kernel found no TPM"

step "dpkg -i"
run dpkg -i "$in"/mcim-tred_*.deb "$in"/mcim-roles_*.deb "$in"/mcimctl_*.deb

step "the roles: PKI in /etc/mcim/pki, systemctl start mcim-roles@all"
run mcimctl pki init --dir /etc/mcim/pki
run chgrp mcim-roles /etc/mcim/pki/*.key /etc/mcim/pki/*.dbkey
run chmod 0640 /etc/mcim/pki/*.key /etc/mcim/pki/*.dbkey
run systemctl start mcim-roles@all

step "tred: the roles' CA and URLs in /etc/mcim/tred.toml, systemctl start tred"
run install -m 0644 /etc/mcim/pki/ca.pem /etc/mcim/ca.pem
cat >>/etc/mcim/tred.toml <<'EOF'
ca_file = "/etc/mcim/ca.pem"
ro_url = "https://127.0.0.1:7402"
vno_url = "https://127.0.0.1:7403"
EOF
if [ -f "$in/tred-dropin.conf" ]; then
    step "tred's unit with the drop-in $(tr '\n' ' ' <"$in/tred-dropin.conf")"
    mkdir -p /etc/systemd/system/tred.service.d
    cp "$in/tred-dropin.conf" /etc/systemd/system/tred.service.d/zz-guest.conf
    systemctl daemon-reload
fi
# The device maker's one-time setting (swtpm's default locks every PIN after 3 tries).
run env TPM2TOOLS_TCTI=device:/dev/tpmrm0 tpm2_dictionarylockout -s -n 32 -t 600 -l 86400
run systemctl start tred
[ "$(stat -c '%U:%G %a' /run/mcim/tred.sock)" = "tred:mcim 660" ] ||
    fail "socket is $(stat -c '%U:%G %a' /run/mcim/tred.sock)"

pki=/etc/mcim/pki
pcid=001010000000001
step "supply (the CCIF embeds the PCID's credential, mode 2)"
run mcimctl supplier supply --supplier-url https://127.0.0.1:7401 \
    --pva-url https://127.0.0.1:7405 --pki $pki --device-id SN-GUEST --pcid $pcid \
    --model guest-meter --ccif-mode 2
# tred's keys are in the TPM behind /dev/tpmrm0: tpm2-tools, not tred, says so.
persistent=$(TPM2TOOLS_TCTI=device:/dev/tpmrm0 tpm2_getcap handles-persistent | wc -l)
[ "$persistent" -ge 2 ] || fail "no persistent keys in the TPM after supply ($persistent)"
step "persistent objects in the TPM: $persistent"

step "local callers: in mcim and mcim-owner may, in neither may not"
run useradd --create-home alice
run usermod -aG mcim,mcim-owner alice
run useradd --create-home mallory
run runuser -u alice -- mcimctl device status >/dev/null
if runuser -u mallory -- mcimctl device status >/dev/null 2>&1; then
    fail "a user in no mcim group used tred"
fi

step "contract, provision (3GPP access, steps 1-14), attach"
run mcimctl device parameters --out /root/device.json \
    --for-subscriber subscriber.mcim.local --sho-id sho.mcim.local
run mcimctl subscriber register --device /root/device.json \
    --sho-url https://127.0.0.1:7404 --pki $pki
last="device provision"
mcimctl device provision --access 3gpp | tee /root/provision.log
grep -q "step 14" /root/provision.log || fail "provisioning did not reach step 14"
last="device attach"
mcimctl device attach | tee /root/attach.log
grep -q "attached with IMSI 00102" /root/attach.log || fail "no operational attach"
last="subscriber status"
mcimctl subscriber status --subscription $pcid --sho-url https://127.0.0.1:7404 --pki $pki \
    --json | tee /root/status.json
grep -q '"state":"provisioned"' /root/status.json || fail "the SHO does not say provisioned"
run mcimctl audit verify

step "journals"
for unit in tred mcim-roles@all; do
    [ "$(systemctl is-active "$unit")" = active ] || fail "$unit is $(systemctl is-active "$unit")"
done
# Priority err and above (systemd's own), and what the daemons wrote to stderr at ERROR
# (tracing's level, tss2's "ERROR:esys"): journald files every stderr line as info.
errors=$(journalctl --no-pager -q -p err -u tred -u 'mcim-roles@*' || true)
[ -z "$errors" ] || fail "errors in the units' journals: $errors"
errors=$(journalctl --no-pager -q -u tred -u 'mcim-roles@*' | grep -E 'ERROR' || true)
[ -z "$errors" ] || fail "ERROR lines in the units' journals: $errors"
step "tred's journal: $(journalctl --no-pager -q -u tred | wc -l) lines, none an error"
step "kill -9: systemd restarts tred and the roles (Restart=on-failure), nothing is lost"
before=$(systemctl show -p MainPID --value tred)
run systemctl kill -s KILL tred
run systemctl kill -s KILL mcim-roles@all
for _ in $(seq 100); do
    now=$(systemctl show -p MainPID --value tred)
    if [ "$(systemctl is-active tred)" = active ] && [ "$(systemctl is-active mcim-roles@all)" = active ] &&
        [ "$now" != 0 ] && [ "$now" != "$before" ]; then
        break
    fi
    sleep 0.2
done
[ "$(systemctl is-active tred)" = active ] || fail "tred not restarted after SIGKILL"
[ "$(systemctl is-active mcim-roles@all)" = active ] || fail "mcim-roles@all not restarted after SIGKILL"
last="attach after restart"
mcimctl device attach | tee /root/attach2.log
grep -q "attached with IMSI 00102" /root/attach2.log || fail "no attach after the restart"
run mcimctl audit verify
run systemctl stop tred
[ "$(systemctl show -p Result --value tred)" = success ] || fail "tred did not stop cleanly"
[ ! -e /run/mcim/tred.sock ] || fail "tred left its socket behind"
run systemctl start tred
# After the kills: systemd rightly logged them; the daemons themselves logged no error.
errors=$(journalctl --no-pager -q _SYSTEMD_UNIT=tred.service + _SYSTEMD_UNIT=mcim-roles@all.service |
    grep -E 'ERROR' || true)
[ -z "$errors" ] || fail "ERROR lines from the daemons after their restart: $errors"
trap - EXIT
echo "MCIM-GUEST-RESULT: ok"
