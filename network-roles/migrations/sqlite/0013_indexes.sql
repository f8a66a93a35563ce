-- Lookups by device, grant, expiry and order (issue 16: the 100,000-device fleet run found these
-- tables read whole on every provisioning, so that each device cost more than the one before).
-- The same statements on both engines.
CREATE INDEX IF NOT EXISTS vno_attach_identity ON vno_attach (identity);
CREATE INDEX IF NOT EXISTS vno_attach_grant ON vno_attach (grant_id);
CREATE INDEX IF NOT EXISTS vno_attach_expires ON vno_attach (expires_at);
CREATE INDEX IF NOT EXISTS ro_registration_pcid ON ro_registration (pcid, made);
CREATE INDEX IF NOT EXISTS ro_registration_made ON ro_registration (made);
CREATE INDEX IF NOT EXISTS sho_registration_pcid ON sho_registration (pcid, made);
CREATE INDEX IF NOT EXISTS sho_registration_made ON sho_registration (made);
CREATE INDEX IF NOT EXISTS sho_registration_state ON sho_registration (state);
