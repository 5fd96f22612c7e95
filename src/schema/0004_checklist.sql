-- The data-change checklist: a delete on a table whose children cascade (ON DELETE CASCADE,
-- SET NULL, SET DEFAULT) fails in its plan unless the job row says so, since the archive cannot
-- restore the children.
ALTER TABLE {jobs}
    ADD COLUMN allow_cascade boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN {jobs}.allow_cascade IS
    'let a delete run although foreign keys cascade into child tables (the plan still lists them)';

-- A frozen job clock. now() moves with every batch transaction, so a predicate like
-- created_at < now() - interval '30 days' selects different rows in each batch; a fragment that
-- uses job_started_at('its job name') instead sees one instant for the whole job: when it was
-- first claimed (its dry run, for a job approved later, so the plan and the run agree).
CREATE FUNCTION {schema}.job_started_at(job text) RETURNS timestamptz
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT started_at FROM {jobs} WHERE name = job $$;

COMMENT ON FUNCTION {schema}.job_started_at(text) IS
    'the job''s frozen clock: when it was first claimed (NULL before that)';
