-- `enqueue` and `check` have the server plan a job's statements before the job exists (or has
-- started). Planning a comparison with job_started_at('name') may call the function to estimate
-- its selectivity, and its error then refused every such predicate on a table with statistics.
-- While backfilld checks a statement (`backfilld.checking` set for that transaction only), a
-- job not found or not started reads as now(); everywhere else those are errors, as before.
CREATE OR REPLACE FUNCTION {schema}.job_started_at(job text) RETURNS timestamptz
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    AS $$
DECLARE
    started timestamptz;
    found_job boolean;
BEGIN
    SELECT j.started_at INTO started FROM {jobs} j WHERE j.name = job;
    found_job := FOUND;
    IF started IS NOT NULL THEN
        RETURN started;
    END IF;
    IF current_setting('backfilld.checking', true) = 'on' THEN
        RETURN now();
    END IF;
    IF NOT found_job THEN
        RAISE EXCEPTION 'job_started_at(%): no job has this name', quote_literal(job)
            USING ERRCODE = '22023';
    END IF;
    RAISE EXCEPTION 'job_started_at(%): that job has not started yet', quote_literal(job)
        USING ERRCODE = '22023';
END
$$;
