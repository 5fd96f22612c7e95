-- The data-change checklist: a delete on a table whose children cascade (ON DELETE CASCADE,
-- SET NULL, SET DEFAULT) fails in its plan unless the job row says so, since the archive cannot
-- restore the children; insert jobs walk a source table (set_clause maps target columns to
-- expressions over the source row).
ALTER TABLE {jobs}
    ADD COLUMN allow_cascade boolean NOT NULL DEFAULT false,
    ADD COLUMN source_table text,
    ADD COLUMN staged_table text;

COMMENT ON COLUMN {jobs}.allow_cascade IS
    'let a delete run although foreign keys cascade into child tables (the plan still lists them)';
COMMENT ON COLUMN {jobs}.staged_table IS
    'updates from a data file: the staging table (in this schema) the job applies by key';
COMMENT ON COLUMN {jobs}.source_table IS
    'action insert: the table walked in keyset batches; set_clause maps its rows to table_name''s columns';

-- A frozen job clock. now() moves with every batch transaction, so a predicate like
-- created_at < now() - interval '30 days' selects different rows in each batch; a fragment that
-- uses job_started_at('its job name') instead sees one instant for the whole job: when it was
-- first claimed (its dry run, for a job approved later, so the plan and the run agree).
CREATE FUNCTION {schema}.job_started_at(job text) RETURNS timestamptz
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT started_at FROM {jobs} WHERE name = job $$;

COMMENT ON FUNCTION {schema}.job_started_at(text) IS
    'the job''s frozen clock: when it was first claimed (NULL before that)';
