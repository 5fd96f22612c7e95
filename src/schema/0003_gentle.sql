-- Gentle by default: a ceiling on how long one batch may hold row locks, and a named preset that
-- picks the defaults of a job's throttle columns ('gentle', the default, or 'fast').
ALTER TABLE {jobs}
    ADD COLUMN max_batch_ms integer,
    ADD COLUMN preset text;

COMMENT ON COLUMN {jobs}.max_batch_ms IS
    'ceiling on one batch''s statements: the longest a session can wait behind its row locks';
COMMENT ON COLUMN {jobs}.preset IS
    '''gentle'' (default: short batches, bloat guard, back-off under load) or ''fast'' (urgent fixes)';
