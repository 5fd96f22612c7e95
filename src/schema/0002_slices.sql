-- Parallel slices: a job may walk its key range as several disjoint slices at once, each with its
-- own cursor, checkpointed in its own batch transactions like the single cursor.
ALTER TABLE {jobs}
    ADD COLUMN parallelism integer,
    ADD COLUMN slices jsonb;

COMMENT ON COLUMN {jobs}.parallelism IS 'slices walked at once (default batch.parallelism)';
COMMENT ON COLUMN {jobs}.slices IS 'daemon-written: [{"cursor": key|null, "upper": key}] per slice';
