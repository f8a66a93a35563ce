-- A device's task sequence numbers only ever grow. The device acknowledges tasks by number
-- and the DPF deletes what was acknowledged; numbering from MAX(seq) of what is left would
-- hand out an acknowledged number again and the device would never see that task.
CREATE TABLE ro_task_seq (
    pcid TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL
);

INSERT INTO ro_task_seq (pcid, last_seq) SELECT pcid, MAX(seq) FROM ro_task GROUP BY pcid;
