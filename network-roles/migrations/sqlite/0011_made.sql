-- The order registrations were made in: the latest of a device's is the one with the highest
-- number. (Queries ordered by SQLite's rowid before; PostgreSQL has none.) Numbered in the
-- statement that inserts, as MAX + 1, under the database's write lock.
ALTER TABLE ro_registration ADD COLUMN made INTEGER NOT NULL DEFAULT 0;
UPDATE ro_registration SET made = rowid;
ALTER TABLE sho_registration ADD COLUMN made INTEGER NOT NULL DEFAULT 0;
UPDATE sho_registration SET made = rowid;
