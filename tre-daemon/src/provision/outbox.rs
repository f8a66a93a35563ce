//! The durable outbox of discard notices (TR 33.812 5.1.3.7.4.2 steps 9-10): a notice the
//! device signed after discarding an old SHO's MCIM stays here, in the state directory
//! (`discard-outbox.json`, replaced atomically), until the old SHO's acknowledgment has
//! verified; it is sent again, with jittered backoff, across restarts of `tred` and of the
//! SHO. An acknowledged notice is kept with its acknowledgment (the record of the change).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::registry::files::{read_optional, write_atomic};

/// One notice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The discarded MCIM's IMSI (one notice per IMSI).
    pub imsi: String,
    /// The old SHO.
    pub sho_id: String,
    /// Where it is.
    pub sho_url: String,
    /// The notice (`mcim_pki::discard::Notice`'s bytes).
    #[serde(with = "hex_bytes")]
    pub notice: Vec<u8>,
    /// The TRE's signature over it.
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
    /// The device's TLS certificate chain.
    #[serde(with = "hex_list")]
    pub chain: Vec<Vec<u8>>,
    /// The old SHO's signed acknowledgment, once it verified.
    #[serde(default, with = "hex_option")]
    pub ack: Option<Vec<u8>>,
    /// When the old SHO acknowledged (seconds since the epoch).
    #[serde(default)]
    pub acknowledged_at: u64,
    /// Deliveries tried.
    #[serde(default)]
    pub attempts: u32,
}

/// The outbox.
#[derive(Debug)]
pub struct Outbox {
    file: PathBuf,
    notices: std::sync::Mutex<Vec<Notice>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Outbox {
    /// The outbox saved in `state_dir`, or an empty one.
    pub fn load(state_dir: &Path) -> Result<Self, String> {
        let file = state_dir.join("discard-outbox.json");
        let notices = match read_optional(&file).map_err(|e| format!("{}: {e}", file.display()))? {
            Some(b) => serde_json::from_slice(&b)
                .map_err(|e| format!("{}: unreadable: {e}", file.display()))?,
            None => Vec::new(),
        };
        Ok(Self {
            file,
            notices: std::sync::Mutex::new(notices),
            changed: tokio::sync::watch::channel(0).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Notice>> {
        self.notices.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, notices: &[Notice]) -> Result<(), String> {
        let json = serde_json::to_vec_pretty(notices).map_err(|e| e.to_string())?;
        write_atomic(&self.file, &json).map_err(|e| format!("{}: {e}", self.file.display()))
    }

    /// Keeps `n` (saved before this returns) unless a notice for its IMSI is there already.
    pub fn put(&self, n: Notice) -> Result<(), String> {
        let mut all = self.lock();
        if all.iter().any(|m| m.imsi == n.imsi) {
            return Ok(());
        }
        let mut next = all.clone();
        next.push(n);
        self.save(&next)?;
        *all = next;
        drop(all);
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Sets where the old SHO of the notice for `imsi` is, when it was not known yet (a revert
    /// to the pristine state learns it at the registration). A known address stays.
    pub fn set_url(&self, imsi: &str, url: &str) -> Result<(), String> {
        if !url.starts_with("https://") {
            return Err(format!("the old SHO's address {url:?} is not https://"));
        }
        let mut all = self.lock();
        let mut next = all.clone();
        match next.iter_mut().find(|n| n.imsi == imsi) {
            Some(n) if n.sho_url.is_empty() => n.sho_url = url.to_string(),
            _ => return Ok(()),
        }
        self.save(&next)?;
        *all = next;
        drop(all);
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Notices not yet acknowledged whose old SHO's address is known.
    pub fn deliverable(&self) -> Vec<Notice> {
        self.lock()
            .iter()
            .filter(|n| n.ack.is_none() && !n.sho_url.is_empty())
            .cloned()
            .collect()
    }

    /// The notice for `imsi`.
    pub fn get(&self, imsi: &str) -> Option<Notice> {
        self.lock().iter().find(|n| n.imsi == imsi).cloned()
    }

    /// Every notice, acknowledged or not.
    pub fn all(&self) -> Vec<Notice> {
        self.lock().clone()
    }

    /// Records a verified acknowledgment (or, with `None`, one more failed attempt).
    pub fn record(&self, imsi: &str, ack: Option<(Vec<u8>, u64)>) -> Result<(), String> {
        let mut all = self.lock();
        let mut next = all.clone();
        let Some(n) = next.iter_mut().find(|n| n.imsi == imsi) else {
            return Ok(());
        };
        match ack {
            Some((ack, at)) => {
                n.ack = Some(ack);
                n.acknowledged_at = at;
            }
            None => n.attempts = n.attempts.saturating_add(1),
        }
        self.save(&next)?;
        *all = next;
        drop(all);
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The pause before delivery attempt `attempts + 1`: doubling from half a second up to a
/// minute, each drawn at random between half and all of it (so a fleet whose old SHO was down
/// does not come back all at once).
pub fn backoff(attempts: u32) -> Duration {
    let ceiling = 500u64.saturating_mul(1 << attempts.min(7)).min(60_000);
    let ms = ceiling / 2 + rand::random::<u64>() % (ceiling / 2 + 1);
    Duration::from_millis(ms)
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

mod hex_option {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|h| hex::decode(h).map_err(serde::de::Error::custom))
            .transpose()
    }
}

mod hex_list {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(hex::encode))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|h| hex::decode(h).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(imsi: &str) -> Notice {
        Notice {
            imsi: imsi.into(),
            sho_id: "sho.mcim.local".into(),
            sho_url: "https://127.0.0.1:1".into(),
            notice: b"n".to_vec(),
            signature: b"s".to_vec(),
            chain: vec![b"c".to_vec()],
            ack: None,
            acknowledged_at: 0,
            attempts: 0,
        }
    }

    /// A notice survives a restart until it is acknowledged; a second one for the same IMSI
    /// changes nothing; the acknowledgment is kept.
    #[test]
    fn notices_survive_a_restart_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::load(dir.path()).unwrap();
        o.put(notice("001020000000001")).unwrap();
        let mut again = notice("001020000000001");
        again.sho_url = "https://elsewhere:1".into();
        o.put(again).unwrap();
        o.record("001020000000001", None).unwrap();
        let o = Outbox::load(dir.path()).unwrap();
        let p = o.deliverable();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].sho_url, "https://127.0.0.1:1");
        assert_eq!(p[0].attempts, 1);
        o.record("001020000000001", Some((b"ack".to_vec(), 7)))
            .unwrap();
        let o = Outbox::load(dir.path()).unwrap();
        assert!(o.deliverable().is_empty());
        assert_eq!(
            o.get("001020000000001").and_then(|n| n.ack),
            Some(b"ack".to_vec())
        );
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_bounded() {
        for a in 0..20 {
            let d = backoff(a);
            let ceiling = Duration::from_millis(500u64.saturating_mul(1 << a.min(7)).min(60_000));
            assert!(d >= ceiling / 2 && d <= ceiling, "{a}: {d:?}");
        }
    }
}
