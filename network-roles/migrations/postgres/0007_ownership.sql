-- Proofs of ownership the SHO has taken (TR 33.812 annex x.2.3): each is used for one
-- contract, once.
CREATE TABLE sho_ownership_proof (
    nonce TEXT PRIMARY KEY,
    pcid TEXT NOT NULL,
    subscriber TEXT NOT NULL
);
