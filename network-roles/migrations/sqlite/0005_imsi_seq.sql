-- The SHO's IMSI numbers only ever grow: numbering from COUNT(*) would hand out a number
-- again once a subscription is deleted.
CREATE TABLE sho_imsi_seq (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);

INSERT INTO sho_imsi_seq (id, last) SELECT 1, COUNT(*) FROM sho_subscription;
