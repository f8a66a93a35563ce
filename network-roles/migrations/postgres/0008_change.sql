-- Change of SHO (TR 33.812 5.1.3.7.4.2; 5.1.3.7.4.3).

-- RO (DRF): an SHO a device may change to (step 1: its subscriber contracted there while
-- another SHO serves it). It becomes the device's SHO in ro_subscription once the device has
-- re-provisioned there (step 14).
CREATE TABLE ro_sho_offer (
    pcid TEXT NOT NULL,
    sho_id TEXT NOT NULL,
    sho_url TEXT NOT NULL,
    PRIMARY KEY (pcid, sho_id)
);

-- RO: the SHO each registration was made at (a change registers at another SHO than the one
-- serving the device); for a change, the SHO it changes from, and whether the old SHO's
-- acknowledgment was relayed to the new one (step 11).
ALTER TABLE ro_registration ADD COLUMN sho_url TEXT NOT NULL DEFAULT '';
ALTER TABLE ro_registration ADD COLUMN change_from TEXT NOT NULL DEFAULT '';
ALTER TABLE ro_registration ADD COLUMN discard_relayed BIGINT NOT NULL DEFAULT 0;
-- How many times the device downloaded the package (a failed install is retried from the
-- device's kept copy: one download per registration is the rule, more is worth a look).
ALTER TABLE ro_registration ADD COLUMN downloads BIGINT NOT NULL DEFAULT 0;
-- A change by reverting to the pristine state (5.1.3.7.4.3): the device discarded the old MCIM
-- itself; no discard order, no relayed acknowledgment.
ALTER TABLE ro_registration ADD COLUMN pristine BIGINT NOT NULL DEFAULT 0;
-- A change that keeps the old MCIM beside the new one (end of 5.1.3.7.4.2): nothing discarded.
ALTER TABLE ro_registration ADD COLUMN keep_old BIGINT NOT NULL DEFAULT 0;

-- Old SHO: the discard notices it received (step 9) and the acknowledgments it sent (10),
-- one per IMSI; an IMSI here gets no more vectors.
CREATE TABLE sho_discard (
    imsi TEXT PRIMARY KEY,
    pcid TEXT NOT NULL,
    notice BYTEA NOT NULL,
    ack BYTEA NOT NULL,
    acknowledged_at BIGINT NOT NULL
);

-- New SHO: the privacy-filtered acknowledgment the DPF relayed (step 11), as received.
ALTER TABLE sho_registration ADD COLUMN discard_ack BYTEA;
-- The IMSI a registration provisions (a device that comes back gets another); '' in rows made
-- before: the subscription's.
ALTER TABLE sho_registration ADD COLUMN imsi TEXT NOT NULL DEFAULT '';
