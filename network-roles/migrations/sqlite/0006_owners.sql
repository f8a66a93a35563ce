-- Who owns what (TR 33.812 annex x.3, the trust model): what a caller may touch is decided by
-- who created it, so it is recorded.
--
-- The highest task number the DPF has streamed to each device: a device acknowledges only
-- tasks it was sent (anything more is refused and deletes nothing). Devices that were mid-run
-- when this migration ran were sent, at most, every task numbered so far.
CREATE TABLE ro_task_sent (
    pcid TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
);
INSERT INTO ro_task_sent (pcid, last_seq) SELECT pcid, last_seq FROM ro_task_seq;

-- The SHO that asked the PVA for a validation: it alone reads the result.
ALTER TABLE pva_validation ADD COLUMN requested_by TEXT NOT NULL DEFAULT '';

-- The subscriber that registered a PCID's initial credentials (CCIF mode 3): it alone
-- activates it. Empty for credentials the supplier registered.
ALTER TABLE icf_pcid ADD COLUMN registered_by TEXT NOT NULL DEFAULT '';
