//! The USIM's files (ETSI TS 102 221 clause 13, 3GPP TS 31.102 clause 4): the MF with EF_ICCID
//! and EF_DIR, and ADF.USIM with the EFs a UE reads at attach and writes while it is attached.
//! Contents come from the MCIM (the IMSI, the SHO's name); the rest are the defaults a test
//! network's USIM carries.

/// ADF.USIM's AID: the 3GPP RID A000000087, application 1002 (USIM, TS 101 220 annex E), then
/// country and provider fields left open (FF) and an application provider code.
pub const USIM_AID: [u8; 16] = [
    0xa0, 0x00, 0x00, 0x00, 0x87, 0x10, 0x02, 0xff, 0xff, 0xff, 0xff, 0x89, 0x07, 0x09, 0x00, 0x00,
];

/// The MF.
pub const MF: u16 = 0x3f00;
/// ADF.USIM's file id when a path names it (TS 102 221 8.4.2: 7FFF is the current ADF).
pub const ADF: u16 = 0x7fff;

/// How an EF is structured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Structure {
    /// Read and written by offset (READ/UPDATE BINARY).
    Transparent,
    /// Records of one length (READ/UPDATE RECORD).
    LinearFixed(usize),
}

/// An elementary file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ef {
    /// Its file id.
    pub fid: u16,
    /// Its structure.
    pub structure: Structure,
    /// Its contents (all records, one after another, for a linear fixed EF).
    pub body: Vec<u8>,
    /// Readable only after the PIN (when the MCIM has one).
    pub pin_to_read: bool,
    /// The UE may write it (UPDATE), after the PIN.
    pub writable: bool,
}

/// What the files are made from.
#[derive(Clone, Debug)]
pub struct Profile {
    /// The MCIM's IMSI (15 digits at most).
    pub imsi: String,
    /// The service provider name (EF_SPN).
    pub spn: String,
    /// The MNC's length in digits (EF_AD), 2 or 3.
    pub mnc_len: u8,
    /// EF_FPLMN's contents before the UE writes it, "MCC-MNC" each.
    pub forbidden_plmns: Vec<String>,
    /// EF_HPPLMN, in steps of 6 minutes.
    pub hpplmn_period: u8,
    /// The UE's updates kept from earlier card sessions, by file id: they replace the
    /// defaults (only files the UE may write, of their exact size).
    pub ue_files: Vec<(u16, Vec<u8>)>,
}

impl Profile {
    /// The profile an MCIM's record gives: the package's data part over the defaults (MNC
    /// of 2 digits, the SHO's id as the name, no forbidden PLMN, 30 minutes), then the UE's
    /// updates.
    pub fn of(imsi: &str, sho: &str, u: &crate::registry::record::UsimRecord) -> Self {
        Self {
            imsi: imsi.to_string(),
            spn: if u.spn.is_empty() {
                sho.to_string()
            } else {
                u.spn.clone()
            },
            mnc_len: u.mnc_len.unwrap_or(2),
            forbidden_plmns: u.forbidden_plmns.clone(),
            hpplmn_period: u.hpplmn_period.unwrap_or(5),
            ue_files: crate::registry::record::UE_PERSISTED
                .iter()
                .filter_map(|(fid, _)| Some((*fid, u.ue_file(*fid)?)))
                .collect(),
        }
    }
}

/// The files under the MF (ICCID, DIR) and under ADF.USIM.
#[derive(Clone, Debug)]
pub struct Files {
    /// EFs directly under the MF.
    pub mf: Vec<Ef>,
    /// EFs under ADF.USIM.
    pub usim: Vec<Ef>,
}

impl Files {
    /// The files of a USIM holding `p`.
    pub fn for_profile(p: &Profile) -> Self {
        let ro = |fid, body| Ef {
            fid,
            structure: Structure::Transparent,
            body,
            pin_to_read: false,
            writable: false,
        };
        let pin = |fid, body| Ef {
            pin_to_read: true,
            ..ro(fid, body)
        };
        let rw = |fid, body| Ef {
            writable: true,
            ..pin(fid, body)
        };
        let mut dir_record = vec![0x61, 0x1a, 0x4f, 0x10];
        dir_record.extend_from_slice(&USIM_AID);
        dir_record.extend_from_slice(&[0x50, 0x06]);
        dir_record.extend_from_slice(b"USIM-1");
        dir_record.resize(38, 0xff);
        let mut files = Self {
            mf: vec![
                ro(0x2fe2, iccid(&p.imsi)),
                Ef {
                    structure: Structure::LinearFixed(38),
                    ..ro(0x2f00, dir_record)
                },
            ],
            usim: vec![
                pin(0x6f07, imsi(&p.imsi)),
                // EF_AD: normal operation, no OFM; the MNC's length.
                ro(0x6fad, vec![0x00, 0x00, 0x00, p.mnc_len]),
                // EF_UST: GSM access (27), GSM security context (38), EPS mobility
                // management information (85); nothing that needs files absent here.
                pin(0x6f38, service_table(&[27, 38, 85])),
                pin(0x6f56, vec![0x00]),
                pin(0x6f78, access_class(&p.imsi)),
                rw(0x6f7b, fplmn(&p.forbidden_plmns)),
                pin(0x6f31, vec![p.hpplmn_period]),
                ro(0x6f46, spn(&p.spn)),
                // Location information, not updated (TS 31.102 4.2.17, 4.2.23, 4.2.91).
                rw(
                    0x6f7e,
                    vec![
                        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0xff, 0x01,
                    ],
                ),
                rw(0x6f73, {
                    let mut b = vec![0xff; 7];
                    b.extend_from_slice(&[0xff, 0xff, 0xff, 0x00, 0x00, 0xff, 0x01]);
                    b
                }),
                rw(0x6fe3, {
                    let mut b = vec![0xff; 12];
                    b.extend_from_slice(&[0xff, 0xff, 0xff, 0x00, 0x00, 0x01]);
                    b
                }),
                // Ciphering and integrity keys, no key set (KSI 7).
                rw(0x6f08, key_set()),
                rw(0x6f09, key_set()),
            ],
        };
        for (fid, body) in &p.ue_files {
            if let Some(ef) = files
                .usim
                .iter_mut()
                .find(|e| e.fid == *fid && e.writable && e.body.len() == body.len())
            {
                ef.body.clone_from(body);
            }
        }
        files
    }
}

/// A PLMN as three octets (TS 24.008 10.5.1.3): MCC digit 2 and 1, MNC digit 3 (F for two
/// digits) and MCC digit 3, MNC digit 2 and 1.
fn plmn_octets(plmn: &str) -> Option<[u8; 3]> {
    let (mcc, mnc) = crate::registry::record::plmn(plmn)?;
    let d = |s: &str, i: usize| s.as_bytes().get(i).map_or(0x0f, |c| c - b'0');
    Some([
        d(mcc, 1) << 4 | d(mcc, 0),
        d(mnc, 2) << 4 | d(mcc, 2),
        d(mnc, 1) << 4 | d(mnc, 0),
    ])
}

/// EF_FPLMN: four PLMNs of three octets, unused ones FF.
fn fplmn(plmns: &[String]) -> Vec<u8> {
    let mut b: Vec<u8> = plmns
        .iter()
        .filter_map(|p| plmn_octets(p))
        .take(4)
        .flatten()
        .collect();
    b.resize(12, 0xff);
    b
}

/// Nibbles two to an octet, the first in the low half; an odd last one padded with F.
fn pack_nibbles(nibbles: &[u8]) -> Vec<u8> {
    nibbles
        .chunks(2)
        .map(|c| c[0] | (c.get(1).copied().unwrap_or(0x0f) << 4))
        .collect()
}

/// BCD with nibbles swapped, F-padded (TS 102 221 13.2 for the ICCID).
fn swapped_bcd(digits: &str, len: usize) -> Vec<u8> {
    let nibbles: Vec<u8> = digits
        .bytes()
        .filter(u8::is_ascii_digit)
        .map(|d| d - b'0')
        .collect();
    let mut out = pack_nibbles(&nibbles);
    out.resize(len, 0xff);
    out
}

/// EF_ICCID: "89" (telecom), a test-network issuer "882", 14 digits of SHA-256 over the
/// IMSI, a Luhn check digit: 20 digits, one per MCIM, readable without the PIN and so
/// telling nothing of the IMSI.
pub fn iccid(imsi: &str) -> Vec<u8> {
    let hash = mcim_core::tpm::kdf::sha256(&[b"mcim iccid", imsi.as_bytes()]);
    let mut digits = String::from("89882");
    digits.extend(hash.iter().take(14).map(|b| char::from(b'0' + b % 10)));
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    digits.push(char::from(
        b'0' + u8::try_from((10 - sum % 10) % 10).unwrap_or(0),
    ));
    swapped_bcd(&digits, 10)
}

/// EF_IMSI (TS 31.102 4.2.2; TS 24.008 10.5.1.4): length, then the digits in BCD after the
/// identity type "IMSI" and the odd/even flag.
pub fn imsi(imsi: &str) -> Vec<u8> {
    let digits: Vec<u8> = imsi.bytes().map(|d| d.wrapping_sub(b'0') & 0x0f).collect();
    let odd = !digits.len().is_multiple_of(2);
    let mut nibbles = vec![if odd { 0x9 } else { 0x1 }];
    nibbles.extend_from_slice(&digits);
    let mut body = pack_nibbles(&nibbles);
    let len = u8::try_from(body.len()).unwrap_or(8);
    body.insert(0, len);
    body.resize(9, 0xff);
    body
}

/// The IMSI an EF_IMSI holds, back.
pub fn imsi_of(ef: &[u8]) -> Option<String> {
    let (len, rest) = ef.split_first()?;
    let body = rest.get(..usize::from(*len))?;
    let mut digits = String::new();
    for (i, b) in body.iter().enumerate() {
        for (j, n) in [b & 0x0f, b >> 4].into_iter().enumerate() {
            if i == 0 && j == 0 {
                continue; // identity type and parity
            }
            if n < 10 {
                digits.push(char::from(b'0' + n));
            }
        }
    }
    Some(digits)
}

/// A service table with `services` (numbered from 1) available.
fn service_table(services: &[usize]) -> Vec<u8> {
    let mut t = vec![0u8; 14];
    for s in services {
        if let Some(b) = t.get_mut((s - 1) / 8) {
            *b |= 1 << ((s - 1) % 8);
        }
    }
    t
}

/// EF_ACC: the access class the IMSI's last digit gives (TS 22.011 4.2).
fn access_class(imsi: &str) -> Vec<u8> {
    let class = imsi
        .bytes()
        .last()
        .map_or(0, |d| u16::from(d.wrapping_sub(b'0') % 10));
    (1u16 << class).to_be_bytes().to_vec()
}

/// EF_SPN: display condition, then the name in the GSM default alphabet's ASCII subset,
/// F-padded to 16 octets.
fn spn(name: &str) -> Vec<u8> {
    let mut b = vec![0x01];
    b.extend(
        name.bytes()
            .filter(|c| c.is_ascii_graphic() || *c == b' ')
            .take(16),
    );
    b.resize(17, 0xff);
    b
}

/// EF_KEYS / EF_KEYSPS: KSI 7 (no key), CK and IK unset.
fn key_set() -> Vec<u8> {
    let mut b = vec![0x07];
    b.extend_from_slice(&[0xff; 32]);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ef_imsi_encodes_as_ts_31_102_says_and_decodes_back() {
        // TS 31.102 4.2.2's layout for a 15-digit IMSI: 08 then 0x9 | d1 ...
        assert_eq!(hex::encode(imsi("001010123456789")), "080910101032547698");
        assert_eq!(
            imsi_of(&imsi("001010123456789")).unwrap(),
            "001010123456789"
        );
        assert_eq!(imsi_of(&imsi("00101012345678")).unwrap(), "00101012345678");
    }

    #[test]
    fn package_data_and_ue_updates_replace_the_defaults() {
        let u = crate::registry::record::UsimRecord {
            mnc_len: Some(3),
            spn: "Meters Ltd".into(),
            forbidden_plmns: vec!["262-01".into(), "310-410".into()],
            hpplmn_period: Some(2),
            ue_files: [("6F7E".to_string(), "0102030405060708090a0b".to_string())].into(),
        };
        let f = Files::for_profile(&Profile::of("310410123456789", "sho.example", &u));
        let ef = |fid| &f.usim.iter().find(|e| e.fid == fid).unwrap().body;
        assert_eq!(ef(0x6fad), &[0, 0, 0, 3]);
        assert_eq!(&ef(0x6f46)[1..11], b"Meters Ltd");
        assert_eq!(hex::encode(ef(0x6f7b)), "62f210130014ffffffffffff");
        assert_eq!(ef(0x6f31), &[2]);
        assert_eq!(hex::encode(ef(0x6f7e)), "0102030405060708090a0b");
        let d = Files::for_profile(&Profile::of(
            "001010123456789",
            "sho.example",
            &Default::default(),
        ));
        let ef = |fid| &d.usim.iter().find(|e| e.fid == fid).unwrap().body;
        assert_eq!(ef(0x6fad), &[0, 0, 0, 2]);
        assert_eq!(&ef(0x6f46)[1..12], b"sho.example");
        assert_eq!(ef(0x6f7b), &[0xff; 12]);
        assert_eq!(ef(0x6f31), &[5]);
    }

    #[test]
    fn the_iccid_has_a_valid_luhn_digit() {
        let ef = iccid("001010123456789");
        let digits: String = ef
            .iter()
            .flat_map(|b| [b & 0x0f, b >> 4])
            .map(|n| char::from(b'0' + n))
            .collect();
        assert_eq!(digits.len(), 20);
        assert!(digits.starts_with("89882"));
        assert!(!digits.contains("0101012345"), "no IMSI digits: {digits}");
        assert_ne!(iccid("001010123456789"), iccid("001010123456788"));
        let sum: u32 = digits
            .bytes()
            .rev()
            .enumerate()
            .map(|(i, d)| {
                let d = u32::from(d - b'0');
                if i % 2 == 1 {
                    let x = d * 2;
                    if x > 9 { x - 9 } else { x }
                } else {
                    d
                }
            })
            .sum();
        assert_eq!(sum % 10, 0, "{digits}");
    }
}
