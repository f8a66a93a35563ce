-- The PVA's state (TR 33.812 5.1.3.5.8): reference values per model, and validations.
CREATE TABLE pva_reference (
    model TEXT PRIMARY KEY,
    -- JSON: {"pcrs": [[index, "hex"], ...], "allow_pkcs11": bool, "pkcs11_measurement": "hex"}
    body TEXT NOT NULL
);

CREATE TABLE pva_validation (
    id TEXT PRIMARY KEY,
    pcid TEXT NOT NULL,
    nonce BLOB NOT NULL,
    -- mcim.pva.v1.Verdict: 1 trusted, 2 untrusted, 3 pending
    verdict INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    result BLOB,
    expires_at INTEGER
);
