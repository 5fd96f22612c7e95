-- job_started_at() of a name no job has, or of a job not yet started, returned NULL: a predicate
-- comparing with it selected no row, and the job "succeeded" changing nothing, verified. Both
-- are errors now (SQLSTATE 22023, so the job fails with the message rather than retrying).
CREATE OR REPLACE FUNCTION {schema}.job_started_at(job text) RETURNS timestamptz
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    AS $$
DECLARE
    started timestamptz;
BEGIN
    SELECT j.started_at INTO started FROM {jobs} j WHERE j.name = job;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job_started_at(%): no job has this name', quote_literal(job)
            USING ERRCODE = '22023';
    END IF;
    IF started IS NULL THEN
        RAISE EXCEPTION 'job_started_at(%): that job has not started yet', quote_literal(job)
            USING ERRCODE = '22023';
    END IF;
    RETURN started;
END
$$;

COMMENT ON FUNCTION {schema}.job_started_at(text) IS
    'the job''s frozen clock: when it was first claimed (an error for an unknown or unstarted job)';
