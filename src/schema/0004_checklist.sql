-- The data-change checklist: a delete on a table whose children cascade (ON DELETE CASCADE,
-- SET NULL, SET DEFAULT) fails in its plan unless the job row says so, since the archive cannot
-- restore the children.
ALTER TABLE {jobs}
    ADD COLUMN allow_cascade boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN {jobs}.allow_cascade IS
    'let a delete run although foreign keys cascade into child tables (the plan still lists them)';
