-- Who follows a registration through steps 10-11 (sho::follower) and until when (seconds since
-- the epoch): any number of SHO processes may share one database (issue 16, replicas). The
-- follower renews its lease at every step; a registration whose lease ran out (its process
-- died) is taken over by another process's sweep, and a process that starts takes over every
-- registration in flight (its own, from before a crash, among them).
ALTER TABLE sho_registration ADD COLUMN follower TEXT NOT NULL DEFAULT '';
ALTER TABLE sho_registration ADD COLUMN follow_until INTEGER NOT NULL DEFAULT 0;
