//! The MCIM as a USIM over raw APDUs (`usim_socket`), on swtpm: ETSI TS 102 221 / 3GPP
//! TS 31.102 commands against the real `tred`, with the authentication vectors computed
//! independently by osmocom's `osmo-auc-gen` (Debian libosmocore-utils) from the same K and
//! OPc.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;

use mcim_e2e::{Swtpm, Tred, mcimctl, output_text};

use mcim_e2e::test_set_1::{IMSI, K, OPC, RAND};
const USIM_AID: &str = "a0000000871002ffffffff8907090000";

/// One card on the socket.
struct Reader(UnixStream);

impl Reader {
    fn message(&mut self, m: &[u8]) -> Option<Vec<u8>> {
        let len = u16::try_from(m.len()).unwrap().to_be_bytes();
        self.0.write_all(&len).unwrap();
        self.0.write_all(m).unwrap();
        if m.len() == 1 && m[0] != 4 {
            return None;
        }
        let mut len = [0u8; 2];
        self.0.read_exact(&mut len).unwrap();
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
        self.0.read_exact(&mut answer).unwrap();
        Some(answer)
    }

    /// Sends a command APDU (hex); the response data and SW1SW2.
    fn apdu(&mut self, hex_apdu: &str) -> (Vec<u8>, u16) {
        let r = self.message(&hex::decode(hex_apdu).unwrap()).unwrap();
        let (data, sw) = r.split_at(r.len() - 2);
        (data.to_vec(), u16::from_be_bytes([sw[0], sw[1]]))
    }
}

/// A PIN field: the digits, FF-padded to 8 octets.
fn pin(p: &str) -> String {
    let mut b = p.as_bytes().to_vec();
    b.resize(8, 0xff);
    hex::encode(b)
}

/// `osmo-auc-gen`'s answer, as `name: value` pairs.
fn osmo_auc_gen(args: &[&str]) -> Vec<(String, String)> {
    let out = Command::new("osmo-auc-gen")
        .args(["-3", "-a", "milenage", "-k", K, "-o", OPC])
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("osmo-auc-gen (Debian libosmocore-utils; ci/install-deps.sh): {e}")
        });
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn field<'a>(pairs: &'a [(String, String)], name: &str) -> &'a str {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("osmo-auc-gen printed no {name}: {pairs:?}"))
}

/// A device with one MCIM (test set 1, PIN 1234) chosen for connectivity, and its USIM
/// socket.
fn device(tpm: &Swtpm, work: &std::path::Path) -> (Tred, std::path::PathBuf) {
    device_with(tpm, work, &[])
}

use mcim_e2e::usim_device as device_with;

#[test]
fn the_usim_answers_a_modem_with_the_trusted_environments_aka() {
    let tpm = Swtpm::start();
    let work = tempfile::tempdir().unwrap();
    let (tred, usim) = device(&tpm, work.path());
    let mut card = Reader(UnixStream::connect(&usim).unwrap());

    // The ATR; a command before power-on is refused (6985); power on.
    assert_eq!(card.message(&[4]).unwrap()[0], 0x3b);
    assert_eq!(card.apdu("80f2000000").1, 0x6985);
    card.message(&[1]);

    // ADF.USIM by its AID: the FCP says PIN 01 is enabled.
    // (A case 4 command with Le: the FCP at once.)
    let (fcp, sw) = card.apdu(&format!("00a4040410{USIM_AID}00"));
    assert_eq!(sw, 0x9000);
    assert!(
        hex::encode(&fcp).contains("c60690018083"),
        "{}",
        hex::encode(&fcp)
    );
    // EF_IMSI is behind the PIN. (Its FCP asked for without Le: 61xx, as on T=0.)
    assert_eq!(card.apdu("00a40004026f07").1 & 0xff00, 0x6100);
    assert_eq!(card.apdu("00b0000009").1, 0x6982);
    assert_eq!(
        card.apdu(&format!("008800812210{RAND}10{}", "00".repeat(16)))
            .1,
        0x6982
    );
    // A wrong PIN: 63C2 (two tries left); VERIFY without data says the same.
    assert_eq!(card.apdu(&format!("0020000108{}", pin("9999"))).1, 0x63c2);
    assert_eq!(card.apdu("0020000100").1, 0x63c2);
    assert_eq!(card.apdu(&format!("0020000108{}", pin("1234"))).1, 0x9000);
    let (ef, sw) = card.apdu("00b0000009");
    assert_eq!(sw, 0x9000);
    assert_eq!(hex::encode(&ef), "080910101032547698");
    // EF_ICCID, under the MF, by path.
    let (iccid, sw) = card.apdu("00a408040100"); // malformed path: one octet
    assert_eq!((iccid.len(), sw), (0, 0x6a80));
    assert_eq!(card.apdu("00a4080c022fe2").1, 0x9000);
    let (iccid, sw) = card.apdu("00b000000a");
    assert_eq!((iccid.len(), sw), (10, 0x9000));

    // AUTHENTICATE against osmo-auc-gen's vector for SQN 33.
    let v = osmo_auc_gen(&["-f", "b9b9", "-s", "33", "-r", RAND]);
    let autn = field(&v, "AUTN").to_string();
    // As T=0 carries it (no Le): 61 35, then GET RESPONSE; a second GET RESPONSE has
    // nothing left.
    let (r, sw) = card.apdu(&format!("0088008122 10{RAND}10{autn}").replace(' ', ""));
    assert_eq!((r.len(), sw), (0, 0x6135));
    let (r, sw) = card.apdu("00c0000035");
    assert_eq!(sw, 0x9000);
    assert_eq!(card.apdu("00c0000035").1, 0x6985);
    let want = format!(
        "db08{}10{}10{}08{}",
        field(&v, "RES"),
        field(&v, "CK"),
        field(&v, "IK"),
        field(&v, "Kc")
    );
    assert_eq!(
        hex::encode(&r),
        want,
        "RES, CK, IK and Kc as osmo-auc-gen computes them"
    );

    // The same AUTN again: a synchronisation failure whose AUTS osmo-auc-gen accepts.
    let (r, sw) = card.apdu(&format!("008800812210{RAND}10{autn}00"));
    assert_eq!(sw, 0x9000);
    assert_eq!(&r[..2], &[0xdc, 14], "{}", hex::encode(&r));
    let auts = hex::encode(&r[2..]);
    // osmo-auc-gen recovers SQN_MS from the AUTS (and refuses a wrong one): the card's last
    // accepted SQN, 33.
    let resync = osmo_auc_gen(&["-A", &auts, "-r", RAND]);
    assert_eq!(field(&resync, "SQN.MS"), "33", "{resync:?}");

    // A forged AUTN (MAC-A altered): 9862, and nothing was counted.
    let mut forged = hex::decode(&autn).unwrap();
    forged[15] ^= 1;
    let v2 = osmo_auc_gen(&["-f", "b9b9", "-s", "65", "-r", RAND]);
    assert_eq!(
        card.apdu(&format!("008800812210{RAND}10{}", hex::encode(&forged)))
            .1,
        0x9862
    );
    // The card's AKA is tred's: the vector for SQN 65 answers over gRPC too, once; on the
    // card afterwards it is a replay.
    let out = mcimctl(&[
        "device",
        "--socket",
        tred.socket().to_str().unwrap(),
        "aka",
        IMSI,
        "--rand",
        RAND,
        "--autn",
        field(&v2, "AUTN"),
    ]);
    assert!(
        output_text(&out).contains(field(&v2, "RES")),
        "{}",
        output_text(&out)
    );
    let (r, _) = card.apdu(&format!("008800812210{RAND}10{}00", field(&v2, "AUTN")));
    assert_eq!(r[0], 0xdc, "a vector tred used is a replay on the card");

    // UE-written files: EF_LOCI accepts an update of its length, nothing longer.
    // (The current DF is the MF since EF_ICCID: the path from the MF names ADF.USIM's EF.)
    assert_eq!(card.apdu("00a4080c047fff6f7e").1, 0x9000);
    assert_eq!(card.apdu("00d600000b0102030405060708090a0b").1, 0x9000);
    assert_eq!(
        card.apdu("00b000000b").0,
        hex::decode("0102030405060708090a0b").unwrap()
    );
    assert_eq!(card.apdu("00d600000c0102030405060708090a0b0c").1, 0x6700);
    // EF_IMSI is the SHO's, not the UE's to write.
    assert_eq!(card.apdu("00a4000c026f07").1, 0x9000);
    assert_eq!(card.apdu("00d6000001ff").1, 0x6982);
    // Unknown files, instructions and classes.
    assert_eq!(card.apdu("00a40004026f99").1, 0x6a82);
    assert_eq!(card.apdu("00ca000000").1, 0x6d00);
    assert_eq!(card.apdu("f0a40004026f07").1, 0x6e00);

    // VERIFY opened the MCIM's session in the TRE; the card going away ends it.
    let get = || {
        output_text(&mcimctl(&[
            "device",
            "--socket",
            tred.socket().to_str().unwrap(),
            "get",
            IMSI,
        ]))
    };
    assert!(get().contains("selected"), "{}", get());
    drop(card);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !get().contains("activated") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(get().contains("activated"), "{}", get());
}

/// Connections beyond the cap are closed at once, and tred's own API keeps answering.
#[test]
fn idle_connections_cannot_exhaust_tred() {
    let tpm = Swtpm::start();
    let work = tempfile::tempdir().unwrap();
    let (tred, usim) = device(&tpm, work.path());
    let held: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&usim).unwrap())
        .collect();
    // The ninth: closed without a word (EOF), even for the ATR.
    let mut ninth = UnixStream::connect(&usim).unwrap();
    ninth
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let _ = ninth.write_all(&[0, 1, 4]);
    let mut b = [0u8; 1];
    assert_eq!(
        ninth.read(&mut b).unwrap_or(0),
        0,
        "the ninth session was served"
    );
    let status = mcimctl(&[
        "device",
        "--socket",
        tred.socket().to_str().unwrap(),
        "status",
    ]);
    assert!(status.status.success(), "{}", output_text(&status));
    // Half a length header is a partial message: closed within seconds, not held as idle.
    drop(ninth);
    let mut held = held;
    let mut half = held.pop().unwrap();
    half.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    half.write_all(&[0]).unwrap();
    let t = std::time::Instant::now();
    assert_eq!(half.read(&mut b).unwrap_or(0), 0, "closed");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(12),
        "{:?}",
        t.elapsed()
    );
    // A slot freed is a slot served.
    drop(held);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut card = Reader(UnixStream::connect(&usim).unwrap());
    assert_eq!(card.message(&[4]).unwrap()[0], 0x3b);
}

#[test]
fn three_wrong_pins_block_the_application_until_the_puk() {
    let tpm = Swtpm::start();
    let work = tempfile::tempdir().unwrap();
    let (tred, usim) = device(&tpm, work.path());
    let mut card = Reader(UnixStream::connect(&usim).unwrap());
    card.message(&[1]);
    assert_eq!(card.apdu(&format!("00a4040c10{USIM_AID}")).1, 0x9000);
    assert_eq!(card.apdu(&format!("0020000108{}", pin("0000"))).1, 0x63c2);
    assert_eq!(card.apdu(&format!("0020000108{}", pin("0001"))).1, 0x63c1);
    assert_eq!(card.apdu(&format!("0020000108{}", pin("0002"))).1, 0x6983);
    // Blocked: even the right PIN is refused, and tred says the MCIM is PIN-blocked.
    assert_eq!(card.apdu(&format!("0020000108{}", pin("1234"))).1, 0x6983);
    let status = mcimctl(&[
        "device",
        "--socket",
        tred.socket().to_str().unwrap(),
        "get",
        IMSI,
    ]);
    assert!(
        output_text(&status).contains("(pin_blocked)"),
        "{}",
        output_text(&status)
    );
    // A wrong PUK is counted; the right one unblocks with a new PIN, which then verifies.
    let (_, sw) = card.apdu(&format!("002c000110{}{}", pin("00000000"), pin("4321")));
    assert_eq!(sw & 0xfff0, 0x63c0, "{sw:04x}");
    assert_eq!(
        card.apdu(&format!("002c000110{}{}", pin("12345678"), pin("4321")))
            .1,
        0x9000
    );
    assert_eq!(card.apdu(&format!("0020000108{}", pin("4321"))).1, 0x9000);
}

/// The card socket admits the local API's classes: the modem class verifies the PIN and
/// authenticates but may not change or unblock the PIN (the owner's, as on the local API);
/// the audit class and callers in no group are not served at all. Real processes run as
/// other uids and gids (`setpriv`), the client a few lines of Python.
#[test]
fn the_card_socket_serves_each_class_what_the_local_api_does() {
    use std::os::unix::fs::PermissionsExt;
    let tpm = Swtpm::start();
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_tred, usim) = device_with(
        &tpm,
        work.path(),
        &[
            ("MCIM_OWNER_GROUP", "4201"),
            ("MCIM_MODEM_GROUP", "4202"),
            ("MCIM_AUDIT_GROUP", "4203"),
            ("MCIM_SOCKET_MODE", "0666"),
        ],
    );
    let v = osmo_auc_gen(&["-f", "b9b9", "-s", "97", "-r", RAND]);
    // Power on, select ADF.USIM, then each APDU; prints each SW (or "closed").
    let client = r#"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
def msg(b):
    s.sendall(struct.pack(">H", len(b)) + b)
    if len(b) == 1 and b[0] != 4: return None
    h = s.recv(2)
    if len(h) < 2: print("closed"); sys.exit(0)
    n = struct.unpack(">H", h)[0]; d = b""
    while len(d) < n: d += s.recv(n - len(d))
    return d
try:
    msg(b"\x04"); msg(b"\x01")
    for a in sys.argv[2:]:
        print(msg(bytes.fromhex(a))[-2:].hex())
except ConnectionError:
    print("closed")
"#;
    let run = |uid: u32, gid: u32, apdus: &[String]| -> String {
        let out = Command::new("setpriv")
            .args([format!("--reuid={uid}"), format!("--regid={gid}")])
            .arg("--clear-groups")
            .args(["/usr/bin/python3", "-c", client, usim.to_str().unwrap()])
            .args(apdus)
            .output()
            .expect("setpriv (util-linux) and python3");
        output_text(&out)
    };
    let select = format!("00a4040c10{USIM_AID}");
    let verify = format!("0020000108{}", pin("1234"));
    let change = format!("0024000110{}{}", pin("1234"), pin("4321"));
    let unblock = format!("002c000110{}{}", pin("12345678"), pin("4321"));
    let auth = format!("008800812210{RAND}10{}00", field(&v, "AUTN"));
    let all = [
        select.clone(),
        verify.clone(),
        change.clone(),
        unblock.clone(),
        auth,
    ];
    // The modem class: select, VERIFY and AUTHENTICATE yes; CHANGE and UNBLOCK no (6982).
    let modem = run(4302, 4202, &all);
    assert_eq!(
        modem.split_whitespace().collect::<Vec<_>>(),
        ["9000", "9000", "6982", "6982", "9000"],
        "{modem}"
    );
    // The audit class and a caller in no group: closed at once, not a word.
    for (uid, gid) in [(4303, 4203), (4304, 4204)] {
        let out = run(uid, gid, &all);
        assert_eq!(out.trim(), "closed", "uid {uid}: {out}");
    }
    // The owner class changes the PIN; the old one no longer verifies, the new one does.
    let owner = run(4301, 4201, &[select.clone(), verify.clone(), change]);
    assert_eq!(owner.split_whitespace().last(), Some("9000"), "{owner}");
    let after = run(
        4302,
        4202,
        &[select, verify, format!("0020000108{}", pin("4321"))],
    );
    assert_eq!(
        after.split_whitespace().collect::<Vec<_>>(),
        ["9000", "63c2", "9000"],
        "{after}"
    );
}

/// The UE's location updates outlive the card session and a crash of `tred` (kept in the
/// MCIM's registry record); its key sets do not (CK and IK never reach a file: after a reset
/// the UE finds KSI 7, no key); a write of the wrong size changes nothing.
#[test]
fn the_ues_location_outlives_resets_and_crashes_its_keys_do_not() {
    let tpm = Swtpm::start();
    let work = tempfile::tempdir().unwrap();
    let (mut tred, usim) = device(&tpm, work.path());
    let open = || {
        let mut card = Reader(UnixStream::connect(&usim).unwrap());
        card.message(&[1]);
        assert_eq!(card.apdu(&format!("00a4040c10{USIM_AID}")).1, 0x9000);
        assert_eq!(card.apdu(&format!("0020000108{}", pin("1234"))).1, 0x9000);
        card
    };
    let loci = "13001122334400f11012340001";
    let loci = &loci[..22]; // 11 octets: TMSI, LAI, TMSI TIME, status
    let keys = format!("01{}", "ab".repeat(32));
    let mut card = open();
    assert_eq!(card.apdu("00a4000c026f7e").1, 0x9000);
    assert_eq!(card.apdu(&format!("00d600000b{loci}")).1, 0x9000);
    // A record-sized write into a transparent EF, and one too long: refused, nothing kept.
    assert_eq!(card.apdu("00d600000c0102030405060708090a0b0c").1, 0x6700);
    assert_eq!(card.apdu("00a4000c026f08").1, 0x9000);
    assert_eq!(card.apdu(&format!("00d6000021{keys}")).1, 0x9000);
    assert_eq!(hex::encode(card.apdu("00b0000021").0), keys);
    // Power cycle: EF_LOCI as the UE left it, EF_KEYS back to "no key".
    card.message(&[0]);
    drop(card);
    let mut card = open();
    assert_eq!(card.apdu("00a4000c026f7e").1, 0x9000);
    assert_eq!(hex::encode(card.apdu("00b000000b").0), loci);
    assert_eq!(card.apdu("00a4000c026f08").1, 0x9000);
    assert_eq!(card.apdu("00b0000001").0, [0x07]);
    drop(card);
    // Two more updates, the session still open, then kill -9 (found by an outside attack:
    // the start-up check once took a second frequent commit past the anchor for tampering).
    let loci2 = "2100112233440102030000";
    let loci3 = "3100112233440102030000";
    let mut card = open();
    assert_eq!(card.apdu("00a4000c026f7e").1, 0x9000);
    assert_eq!(card.apdu(&format!("00d600000b{loci2}")).1, 0x9000);
    assert_eq!(card.apdu(&format!("00d600000b{loci3}")).1, 0x9000);
    // kill -9 and a fresh tred on the same state: not in lockdown, the last update is there,
    // and the registry's file holds no CK or IK.
    tred.kill_and_restart();
    drop(card);
    let status = output_text(&mcimctl(&[
        "device",
        "--socket",
        tred.socket().to_str().unwrap(),
        "--json",
        "status",
    ]));
    assert!(!status.contains("\"lockdown\":true"), "{status}");
    let audit = mcimctl(&[
        "audit",
        "--socket",
        tred.socket().to_str().unwrap(),
        "verify",
    ]);
    assert!(audit.status.success(), "{}", output_text(&audit));
    let mut card = open();
    assert_eq!(card.apdu("00a4000c026f7e").1, 0x9000);
    assert_eq!(hex::encode(card.apdu("00b000000b").0), loci3);
    let loci = loci3;
    let mut found = String::new();
    for f in walk(&tred.state_dir()) {
        found.push_str(&String::from_utf8_lossy(&std::fs::read(f).unwrap()).to_lowercase());
    }
    assert!(found.contains(loci), "the location is in the registry");
    assert!(!found.contains(&"ab".repeat(16)), "CK/IK reached a file");
}

fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// pyscard (Debian python3-pyscard): connects to the first vpcd reader's card (waiting for
/// it), then sends each APDU (following 61xx with GET RESPONSE); prints the ATR, then
/// "SW data" per APDU.
const PYSCARD: &str = r#"
import sys, time
from smartcard.System import readers
r = [x for x in readers() if str(x).endswith(" 00 00")][0]
deadline = time.time() + 20
while True:
    try:
        c = r.createConnection(); c.connect(); break
    except Exception as e:
        if time.time() > deadline: print("no card:", e); sys.exit(1)
        time.sleep(0.2)
print("atr", bytes(c.getATR()).hex())
for a in sys.argv[1:]:
    d, sw1, sw2 = c.transmit(list(bytes.fromhex(a)))
    if sw1 == 0x61:
        d, sw1, sw2 = c.transmit([0x00, 0xc0, 0x00, 0x00, sw2])
    print("%02x%02x" % (sw1, sw2), bytes(d).hex())
"#;

/// Runs [`PYSCARD`] against `pcscd`; the (SW, data) of each APDU after the ATR.
fn pyscard(pcscd: &mcim_e2e::Pcscd, apdus: &[String]) -> Vec<(String, String)> {
    let mut args = vec!["-c", PYSCARD];
    args.extend(apdus.iter().map(String::as_str));
    let out = pcscd.client("/usr/bin/python3", &args);
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "pyscard: {text}\npcscd: {}",
        pcscd.log()
    );
    let mut lines = text.lines();
    assert!(
        lines.next().is_some_and(|l| l.starts_with("atr 3b")),
        "{text}"
    );
    lines
        .map(|l| {
            let (sw, d) = l.split_once(' ').unwrap_or((l, ""));
            (sw.to_string(), d.trim().to_string())
        })
        .collect()
}

/// The MCIM as a card in a PC/SC reader: pcscd with vsmartcard's vpcd, tred the virtual ICC,
/// pyscard (and `mcimctl card`, through libpcsclite) the applications: EF_IMSI equals the
/// MCIM's IMSI, AUTHENTICATE equals osmo-auc-gen's vector, a replay's AUTS resynchronises in
/// osmo-auc-gen, three wrong PINs block the application until the PUK (the PC/SC side in the
/// owner class here). On swtpm.
#[test]
fn pcsc_applications_see_the_mcim_as_a_usim() {
    let tpm = Swtpm::start();
    pcsc_card_on(mcim_e2e::UsimTre::Tpm(&tpm));
}

/// The same on a SoftHSM2 token.
#[test]
fn pcsc_applications_see_the_mcim_on_a_token_as_a_usim() {
    let hsm = mcim_e2e::SoftHsm::new();
    pcsc_card_on(mcim_e2e::UsimTre::Token(&hsm));
}

fn pcsc_card_on(tre: mcim_e2e::UsimTre<'_>) {
    let pcscd = mcim_e2e::Pcscd::start();
    let work = tempfile::tempdir().unwrap();
    let vpcd = pcscd.vpcd();
    let (_tred, _) = device_with(
        tre,
        work.path(),
        &[
            ("MCIM_USIM_VPCD", vpcd.as_str()),
            ("MCIM_USIM_VPCD_CLASS", "owner"),
        ],
    );
    let v = osmo_auc_gen(&["-f", "b9b9", "-s", "33", "-r", RAND]);
    let autn = field(&v, "AUTN");
    let apdus = [
        "00a4040c07a0000000871002".to_string(), // ADF.USIM by its AID's prefix
        "00a4000c026f07".into(),
        "00b0000009".into(),
        format!("0020000108{}", pin("9999")),
        format!("0020000108{}", pin("1234")),
        "00b0000009".into(),
        format!("008800812210{RAND}10{autn}"),
        format!("008800812210{RAND}10{autn}"),
    ];
    let r = pyscard(&pcscd, &apdus);
    let sws: Vec<&str> = r.iter().map(|(sw, _)| sw.as_str()).collect();
    assert_eq!(
        sws,
        [
            "9000", "9000", "6982", "63c2", "9000", "9000", "9000", "9000"
        ],
        "{r:?}"
    );
    assert_eq!(
        files_imsi(&r[5].1),
        IMSI,
        "EF_IMSI through PC/SC is the MCIM's IMSI"
    );
    let want = format!(
        "db08{}10{}10{}08{}",
        field(&v, "RES"),
        field(&v, "CK"),
        field(&v, "IK"),
        field(&v, "Kc")
    );
    assert_eq!(
        r[6].1, want,
        "RES, CK, IK and Kc as osmo-auc-gen computes them"
    );
    assert!(r[7].1.starts_with("dc0e"), "{:?}", r[7]);
    let resync = osmo_auc_gen(&["-A", &r[7].1[4..], "-r", RAND]);
    assert_eq!(field(&resync, "SQN.MS"), "33", "{resync:?}");

    // mcimctl's own PC/SC client (libpcsclite): the same card.
    let out = pcscd.client(
        mcim_e2e::workspace_bin("mcimctl").to_str().unwrap(),
        &["card", "read", "--pin", "1234", "--json"],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["imsi"], IMSI);
    assert_eq!(j["service_provider_name"], "sho.example");
    assert!(j["iccid"].as_str().unwrap().starts_with("89882"), "{j}");

    // Three wrong PINs block the application; the PUK unblocks it with a new PIN.
    let r = pyscard(
        &pcscd,
        &[
            "00a4040c07a0000000871002".to_string(),
            format!("0020000108{}", pin("0000")),
            format!("0020000108{}", pin("0001")),
            format!("0020000108{}", pin("0002")),
            format!("0020000108{}", pin("1234")),
            format!("002c000110{}{}", pin("12345678"), pin("4321")),
            format!("0020000108{}", pin("4321")),
        ],
    );
    let sws: Vec<&str> = r.iter().map(|(sw, _)| sw.as_str()).collect();
    assert_eq!(
        sws,
        ["9000", "63c2", "63c1", "6983", "6983", "9000", "9000"],
        "{r:?}"
    );
}

/// The IMSI in an EF_IMSI given in hex.
fn files_imsi(hex_ef: &str) -> String {
    let ef = hex::decode(hex_ef).unwrap();
    ef[1..=usize::from(ef[0])]
        .iter()
        .flat_map(|x| [x & 0x0f, x >> 4])
        .skip(1)
        .filter(|n| *n < 10)
        .map(|n| char::from(b'0' + n))
        .collect()
}

/// By default PC/SC applications get the modem class (no CHANGE or UNBLOCK PIN); and a
/// program of another user listening on vpcd's port is not served: tred reads who owns the
/// far end of its connection and answers nothing.
#[test]
fn pcsc_is_the_modem_class_and_an_impostor_vpcd_gets_no_answer() {
    let tpm = Swtpm::start();
    let pcscd = mcim_e2e::Pcscd::start();
    let work = tempfile::tempdir().unwrap();
    let vpcd = pcscd.vpcd();
    let (mut tred, _) = device_with(&tpm, work.path(), &[("MCIM_USIM_VPCD", vpcd.as_str())]);
    let r = pyscard(
        &pcscd,
        &[
            "00a4040c07a0000000871002".to_string(),
            format!("0020000108{}", pin("1234")),
            format!("0024000110{}{}", pin("1234"), pin("4321")),
            format!("002c000110{}{}", pin("12345678"), pin("4321")),
        ],
    );
    let sws: Vec<&str> = r.iter().map(|(sw, _)| sw.as_str()).collect();
    assert_eq!(sws, ["9000", "9000", "6982", "6982"], "{r:?}");
    drop(pcscd);

    // An impostor (uid 4305) listens where vpcd would and plays vpcd: power on, SELECT.
    let port = mcim_e2e::free_ports(1);
    let impostor = r#"
import socket, struct, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1]))); l.listen(1); l.settimeout(30)
print("listening", flush=True)
c, _ = l.accept(); c.settimeout(4)
c.sendall(b"\x00\x01\x01" + struct.pack(">H", 5) + bytes.fromhex("00a4000c02"))
try:
    print("answered" if c.recv(16) else "closed")
except socket.timeout:
    print("silent")
except ConnectionError:
    print("closed")
"#;
    let mut child = Command::new("setpriv")
        .args(["--reuid=4305", "--regid=4305", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", impostor, &port.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv and python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "listening");
    tred.restart_with_env(&[("MCIM_USIM_VPCD", &format!("127.0.0.1:{port}"))]);
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("closed") || said.contains("silent"),
        "the impostor was served: {said}"
    );
    assert!(!said.contains("answered"), "{said}");
    assert!(tred.log().contains("belongs to uid 4305"), "{}", tred.log());
}

/// `mcimctl lab run --usim pcsc`: the operational attach goes through the card (the VNO's
/// challenge as AUTHENTICATE over PC/SC), on swtpm.
#[test]
fn the_lab_attaches_through_the_card_over_pcsc() {
    let (ok, r, err) = mcim_e2e::lab_run(&["--usim", "pcsc"]);
    assert!(ok, "{err}");
    assert_eq!(r["operational_attach"]["ok"], true, "{r:#}");
    assert_eq!(r["operational_attach"]["via"], "usim-pcsc", "{r:#}");
    assert_eq!(r["operational_attach"]["imsi"], r["mcim"]["imsi"], "{r:#}");
    assert!(err.contains("AUTHENTICATE over PC/SC"), "{err}");
    // The card's files from the SHO's package: its IMSI, the MNC's length of its home PLMN
    // (001-02), its service provider name.
    assert_eq!(r["usim"]["imsi"], r["mcim"]["imsi"], "{r:#}");
    assert_eq!(r["usim"]["mnc_length"], 2, "{r:#}");
    assert_eq!(r["usim"]["service_provider_name"], "mcim lab SHO", "{r:#}");
}

/// The same on SoftHSM2, after a change of SHO: the card presents the new SHO's MCIM.
#[test]
fn the_lab_attaches_through_the_card_after_a_change_on_a_token() {
    let (ok, r, err) =
        mcim_e2e::lab_run(&["--usim", "pcsc", "--tre", "pkcs11", "--flow", "change-sho"]);
    assert!(ok, "{err}");
    assert_eq!(r["operational_attach"]["via"], "usim-pcsc", "{r:#}");
    let imsi = r["operational_attach"]["imsi"].as_str().unwrap();
    assert!(imsi.starts_with("00103"), "the second SHO's IMSI: {r:#}");
    assert_eq!(
        r["usim"]["imsi"], imsi,
        "the card presents the new MCIM: {r:#}"
    );
    assert_eq!(
        r["usim"]["service_provider_name"], "mcim lab SHO 2",
        "{r:#}"
    );
}

/// The README's USIM block, run as written against a tred that is the card of a private
/// pcscd: pcsc_scan sees the card, `mcimctl card` reads it and authenticates test set 1's
/// challenge, the pyscard snippet reads EF_IMSI.
#[test]
fn the_readme_usim_block_runs_as_written() {
    let tpm = Swtpm::start();
    let pcscd = mcim_e2e::Pcscd::start();
    let work = tempfile::tempdir().unwrap();
    let vpcd = pcscd.vpcd();
    let (_tred, _) = device_with(&tpm, work.path(), &[("MCIM_USIM_VPCD", vpcd.as_str())]);
    let bin = mcim_e2e::workspace_bin("mcimctl");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -euo pipefail\n{}",
            mcim_e2e::readme_block("usim")
        ))
        .current_dir(work.path())
        .env("PCSCLITE_CSOCK_NAME", pcscd.socket())
        .env(
            "PATH",
            // Debian's python3 (with python3-pyscard) before any other on this machine.
            format!(
                "{}:/usr/bin:{}",
                bin.parent().unwrap().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "the README's usim block failed:\n{text}"
    );
    assert!(text.contains("Card inserted"), "pcsc_scan: {text}");
    assert!(
        text.contains("3B 9F 96 80"),
        "pcsc_scan shows the ATR: {text}"
    );
    assert!(text.contains("imsi: 001010123456789"), "{text}");
    assert!(text.contains("res: a54211d5e3ba50bf"), "{text}");
    assert!(text.contains("00b00000 9000 080910101032547698"), "{text}");
}

/// kill -9 while the card runs AUTHENTICATE or VERIFY, at several points of the call: after
/// each restart the registry is whole (no lockdown, the audit record verifies), the vector in
/// flight was either used (a replay now: AUTS) or not (it answers now), the next fresh vector
/// answers, and a wrong PIN in flight was counted at most once.
#[test]
fn killing_tred_mid_authenticate_or_verify_loses_nothing() {
    use mcim_core::aka::{Amf, Constants, HeSqnState, Milenage, Opc, Rand, SoftKernel, SqnProfile};
    let tpm = Swtpm::start();
    let work = tempfile::tempdir().unwrap();
    let (mut tred, usim) = device(&tpm, work.path());
    let k = mcim_core::aka::K::from_slice(&hex::decode(K).unwrap()).unwrap();
    let m = Milenage::with_opc(
        SoftKernel::new(&k),
        Opc::from_slice(&hex::decode(OPC).unwrap()).unwrap(),
        Constants::default(),
    );
    let profile = SqnProfile::default();
    let mut he = HeSqnState::default();
    let rands: Vec<Rand> = (0..16).map(|i| Rand([i as u8 + 1; 16])).collect();
    let avs =
        mcim_core::aka::generate_avs(&m, &mut he, &profile, Amf([0xb9, 0xb9]), &rands).unwrap();
    let mut next = avs.iter();
    let open = || {
        let mut card = Reader(UnixStream::connect(&usim).unwrap());
        card.message(&[1]);
        assert_eq!(card.apdu(&format!("00a4040c10{USIM_AID}")).1, 0x9000);
        card
    };
    let auth = |v: &mcim_core::aka::AuthVector| {
        format!(
            "008800812210{}10{}00",
            hex::encode(v.rand.0),
            hex::encode(v.autn.0)
        )
    };
    let tries = |s: &str| -> u32 {
        let out = output_text(&mcimctl(&["device", "--socket", s, "--json", "get", IMSI]));
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("{out}"));
        v["pin_retries_left"]
            .as_u64()
            .unwrap_or_else(|| panic!("{v}")) as u32
    };
    for delay_ms in [0u64, 3, 8, 15, 25] {
        // AUTHENTICATE in flight.
        let mut card = open();
        assert_eq!(card.apdu(&format!("0020000108{}", pin("1234"))).1, 0x9000);
        let v = next.next().unwrap();
        let a = hex::decode(auth(v)).unwrap();
        card.0
            .write_all(&u16::try_from(a.len()).unwrap().to_be_bytes())
            .unwrap();
        card.0.write_all(&a).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        tred.kill_and_restart();
        drop(card);
        let s = tred.socket().to_str().unwrap().to_string();
        let audit = mcimctl(&["audit", "--socket", &s, "verify"]);
        assert!(audit.status.success(), "{}", output_text(&audit));
        let mut card = open();
        assert_eq!(card.apdu(&format!("0020000108{}", pin("1234"))).1, 0x9000);
        let (r, sw) = card.apdu(&auth(v));
        assert_eq!(sw, 0x9000);
        assert!(
            (r[0] == 0xdb && r[2..10] == v.xres.0[..]) || r[0] == 0xdc,
            "the vector in flight: {}",
            hex::encode(&r)
        );
        eprintln!("delay {delay_ms}: in flight {:02x}", r[0]);
        let w = next.next().unwrap();
        let (r, sw) = card.apdu(&auth(w));
        assert_eq!((sw, r[0]), (0x9000, 0xdb), "the next fresh vector answers");
        assert_eq!(&r[2..10], &w.xres.0[..]);
        drop(card);

        // A wrong PIN in flight: counted once or not at all, never reset, never twice.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let before = tries(&s);
        let mut card = open();
        let a = hex::decode(format!("0020000108{}", pin("9999"))).unwrap();
        card.0
            .write_all(&u16::try_from(a.len()).unwrap().to_be_bytes())
            .unwrap();
        card.0.write_all(&a).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        tred.kill_and_restart();
        drop(card);
        let after = tries(tred.socket().to_str().unwrap());
        assert!(
            after == before || after + 1 == before,
            "tries {before} -> {after}"
        );
        eprintln!("delay {delay_ms}: tries {before} -> {after}");
        // The right PIN resets the counter for the next round.
        let mut card = open();
        assert_eq!(card.apdu(&format!("0020000108{}", pin("1234"))).1, 0x9000);
        drop(card);
    }
}

/// A PC/SC application sending an "APDU" of one octet: vpcd frames it like a control and
/// waits for an answer; tred answers one that is no control with 6700, and for one that is
/// (00, 01, 02) notices vpcd's silence, closes the connection and comes back: the reader is
/// not wedged, the next application is served (found by an outside attack).
#[test]
fn a_one_octet_apdu_through_pcsc_does_not_wedge_the_reader() {
    let tpm = Swtpm::start();
    let pcscd = mcim_e2e::Pcscd::start();
    let work = tempfile::tempdir().unwrap();
    let vpcd = pcscd.vpcd();
    let (_tred, _) = device_with(&tpm, work.path(), &[("MCIM_USIM_VPCD", vpcd.as_str())]);
    let r = pyscard(&pcscd, &["ff".to_string()]);
    assert_eq!(r[0].0, "6700", "{r:?}");
    // 00: the transmit fails after a few seconds instead of hanging.
    let script = r#"
import sys, time
from smartcard.System import readers
r = [x for x in readers() if str(x).endswith(" 00 00")][0]
c = r.createConnection(); c.connect()
t = time.time()
try:
    c.transmit([0x00]); print("answered")
except Exception as e:
    print("failed after %.1f s" % (time.time() - t))
"#;
    let out = pcscd.client(
        "/usr/bin/timeout",
        &["60", "/usr/bin/python3", "-c", script],
    );
    let text = output_text(&out);
    assert!(text.contains("failed after"), "{text}");
    // The card is back for the next application.
    let r = pyscard(&pcscd, &["00a4040c07a0000000871002".to_string()]);
    assert_eq!(r[0].0, "9000", "{r:?}");
}
