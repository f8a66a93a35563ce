-- Renewal of a PCID's initial connectivity credential (TR 33.812 5.1.3.7.4.3): the new K and
-- OPc wait in the ICF's AuC under 'renewal:<pcid>' (the one in use stays valid) until the
-- device confirms it installed them; the package is kept so that the same request (the same
-- nonce) answers the same package.
CREATE TABLE icf_renewal (
    pcid TEXT PRIMARY KEY,
    nonce BYTEA NOT NULL,
    package BYTEA NOT NULL,
    expires_at BIGINT NOT NULL,
    confirmed BIGINT NOT NULL DEFAULT 0
);
