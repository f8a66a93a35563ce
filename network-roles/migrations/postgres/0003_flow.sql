-- The provisioning flow of TR 33.812 5.1.3.6.2: the AuC data of the RO's ICF (PCIDs) and of the
-- SHO (operational IMSIs), the VNO's attachments, the RO's grants, subscriptions,
-- registrations and device task queues, and the SHO's subscriptions and registrations.

-- K and OPc wrapped (AES-256-KWP) under the role's data key; never stored in the clear.
CREATE TABLE auc_subscriber (
    owner TEXT NOT NULL,          -- "icf" or "sho"
    id TEXT NOT NULL,             -- PCID or IMSI
    k BYTEA NOT NULL,
    opc BYTEA NOT NULL,
    sqn TEXT NOT NULL,            -- JSON HeSqnState
    PRIMARY KEY (owner, id)
);

CREATE TABLE icf_pcid (
    pcid TEXT PRIMARY KEY,
    mode BIGINT NOT NULL,        -- mcim.ro.v1.CredentialMode
    expires_at BIGINT,           -- seconds since the epoch; NULL: no limit
    active BIGINT NOT NULL       -- 0 until ActivatePcid for delayed activation
);

CREATE TABLE ro_grant (
    grant_id TEXT PRIMARY KEY,
    pcid TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE TABLE ro_subscription (
    pcid TEXT PRIMARY KEY,
    sho_id TEXT NOT NULL,
    sho_url TEXT NOT NULL
);

CREATE TABLE ro_registration (
    id TEXT PRIMARY KEY,
    pcid TEXT NOT NULL,
    access BIGINT NOT NULL,      -- mcim.common.v1.AccessType
    sho_id TEXT NOT NULL,
    nonce BYTEA NOT NULL,
    state TEXT NOT NULL,          -- validating, authorized, installed, failed
    package BYTEA,
    detail TEXT NOT NULL DEFAULT '',
    mcim_id TEXT NOT NULL DEFAULT ''
);

-- What reaches a device over its own stream: prost-encoded WatchDeviceTasksResponse bodies.
CREATE TABLE ro_task (
    pcid TEXT NOT NULL,
    seq BIGINT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (pcid, seq)
);

CREATE TABLE vno_attach (
    attach_id TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    caller TEXT NOT NULL,         -- the device certificate that attached
    operational BIGINT NOT NULL, -- 1: IMSI routed to an SHO; 0: PCID routed to an ICF
    rand BYTEA NOT NULL,
    xres BYTEA NOT NULL,
    state TEXT NOT NULL,          -- challenged, granted
    grant_id TEXT,
    expires_at BIGINT NOT NULL
);

CREATE TABLE sho_subscription (
    id TEXT PRIMARY KEY,
    pcid TEXT NOT NULL UNIQUE,
    subscriber TEXT NOT NULL,
    device_id TEXT NOT NULL,
    model TEXT NOT NULL,
    tre_kind BIGINT NOT NULL,    -- mcim.common.v1.TreKind
    storage_public BYTEA NOT NULL,
    imsi TEXT NOT NULL UNIQUE,
    require_aka_in_tre BIGINT NOT NULL
);

CREATE TABLE sho_registration (
    id TEXT PRIMARY KEY,          -- the RO's registration id
    pcid TEXT NOT NULL,
    nonce BYTEA NOT NULL,
    dpf_url TEXT NOT NULL,
    validation_id TEXT NOT NULL,
    validation_nonce BYTEA NOT NULL,
    state BIGINT NOT NULL,       -- mcim.sho.v1.RegistrationState
    detail TEXT NOT NULL DEFAULT '',
    package BYTEA                  -- the signed package, once built (step 11)
);
