-- Remote instructions from an SHO about its own MCIM on a device (TR 33.812 5.1.1.3; 5.1.2.4).

-- At the RO's DPF: each instruction it carried to a device on the device's task stream, who
-- queued it, and the device's report (signed in its TRE) once it came.
CREATE TABLE ro_instruction (
    id TEXT PRIMARY KEY,          -- mcim_pki::instruction::instruction_id(body)
    pcid TEXT NOT NULL,
    sho_id TEXT NOT NULL,         -- the SHO that queued it (it alone reads the report)
    body BYTEA NOT NULL,           -- the SHO's COSE_Sign1
    queued_at BIGINT NOT NULL,
    report BYTEA,                  -- the device's report, its signature, its TLS leaf
    signature BYTEA,
    certificate BYTEA,
    reported_at BIGINT
);

-- At the SHO: the instructions it signed, numbered per device, and the device's verified
-- report.
CREATE TABLE sho_instruction (
    id TEXT PRIMARY KEY,
    pcid TEXT NOT NULL,
    imsi TEXT NOT NULL,
    dpf_url TEXT NOT NULL,
    seq BIGINT NOT NULL,
    action TEXT NOT NULL,
    body BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    outcome TEXT,
    mcim_state TEXT,
    reason TEXT,
    reported_at BIGINT,
    UNIQUE (pcid, seq)
);
