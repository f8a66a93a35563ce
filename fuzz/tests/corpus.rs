//! Every fuzz target's corpus (`corpus/<target>/`: the seeds, and what fuzzing runs kept or
//! found) replayed through the target on stable: no input may panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

#[test]
fn every_target_replays_its_corpus_without_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, target) in mcim_fuzz::TARGETS {
        let dir = root.join(name);
        let mut inputs = 0;
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let data = std::fs::read(&path).unwrap();
            let caught = std::panic::catch_unwind(|| target(&data));
            assert!(caught.is_ok(), "{name}: {} panicked", path.display());
            inputs += 1;
        }
        assert!(inputs > 0, "{name} has no corpus");
    }
}

#[test]
fn parts_splits_by_length_prefix() {
    assert_eq!(
        mcim_fuzz::parts(&[0, 2, 1, 2, 3, 4], 2),
        vec![&[1u8, 2][..], &[3, 4][..]]
    );
    let empty: &[u8] = &[];
    assert_eq!(mcim_fuzz::parts(&[0, 9, 1], 3), vec![&[1u8][..], empty]);
    assert_eq!(mcim_fuzz::parts(&[], 3), vec![empty]);
}
