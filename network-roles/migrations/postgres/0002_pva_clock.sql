-- The last TPM clock a device's quotes showed (TR 33.812 5.1.3.6.2 step 9; issue 5: "TPM clock
-- and reset counters never going backwards for a device").
CREATE TABLE pva_device_clock (
    pcid TEXT PRIMARY KEY,
    reset_count BIGINT NOT NULL,
    restart_count BIGINT NOT NULL,
    clock BIGINT NOT NULL
);
