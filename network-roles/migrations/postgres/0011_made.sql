-- The order registrations were made in: the latest of a device's is the one with the highest
-- number, numbered in the statement that inserts, as MAX + 1, under the write lock
-- (store::begin_write). (SQLite's copy of this migration numbers its older rows by rowid;
-- PostgreSQL databases start at this version with none.)
ALTER TABLE ro_registration ADD COLUMN made BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sho_registration ADD COLUMN made BIGINT NOT NULL DEFAULT 0;
