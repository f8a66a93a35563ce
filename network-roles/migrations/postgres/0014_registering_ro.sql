-- The RO that registered each device at this SHO (5.1.3.6.2 step 7): only it may report on
-- the registration (step 14) or relay a discard acknowledgment to it (5.1.3.7.4.2 step 11).
-- Rows from before this column hold '' and stay open to any RO, as they were.
-- The same statement on both engines.
ALTER TABLE sho_registration ADD COLUMN ro TEXT NOT NULL DEFAULT '';
