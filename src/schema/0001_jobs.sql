-- backfill.jobs: one row per data change. Users INSERT rows; the daemon owns the state columns.
-- User-written columns carry no CHECK constraints on purpose: a malformed row is accepted and then
-- failed by the daemon with a message in last_error, so nothing a user typed is lost.
CREATE TABLE {jobs} (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                text NOT NULL,
    table_name          text,
    predicate           text,
    action              text DEFAULT 'update',
    set_clause          text,
    key_columns         text[],
    mode                text DEFAULT 'dry_run',
    batch_size          integer,
    target_batch_ms     integer,
    sleep_ms            integer,
    max_rows_per_second integer,
    max_affected        bigint,
    archive             boolean DEFAULT true,
    priority            integer NOT NULL DEFAULT 0,
    run_at              timestamptz NOT NULL DEFAULT now(),
    requested_state     text,

    state               text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'running', 'planned', 'paused', 'succeeded', 'failed', 'cancelled')),
    attempt             integer NOT NULL DEFAULT 0,
    lease_owner         text,
    lease_expires_at    timestamptz,
    heartbeat_at        timestamptz,
    upper_bound         jsonb,
    cursor              jsonb,
    rows_scanned        bigint NOT NULL DEFAULT 0,
    rows_changed        bigint NOT NULL DEFAULT 0,
    rows_skipped        bigint NOT NULL DEFAULT 0,
    batches             bigint NOT NULL DEFAULT 0,
    batch_size_current  integer,
    estimated_total     bigint,
    plan                jsonb,
    remaining           bigint,
    archive_table       text,
    reverts             text,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT jobs_name_key UNIQUE (name)
);

COMMENT ON TABLE {jobs} IS 'backfilld jobs: INSERT a row to enqueue a data change; see backfilld status';
COMMENT ON COLUMN {jobs}.requested_state IS 'operator control: paused | running | cancelled';

-- The claim query walks this partial index: only rows that could become runnable are in it.
CREATE INDEX jobs_claimable ON {jobs} (priority DESC, run_at, id)
    WHERE state IN ('pending', 'paused', 'planned');
-- Rescue of expired leases looks only at running rows.
CREATE INDEX jobs_running_lease ON {jobs} (lease_expires_at) WHERE state = 'running';

CREATE FUNCTION {schema}.jobs_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE TRIGGER jobs_touch BEFORE UPDATE ON {jobs}
    FOR EACH ROW EXECUTE FUNCTION {schema}.jobs_touch();

-- "A name runs once": the table is an execution ledger, so rows are never deleted.
CREATE FUNCTION {schema}.jobs_keep_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'backfill jobs are an execution ledger and cannot be deleted (job %); cancel it instead', OLD.name
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE TRIGGER jobs_keep_ledger BEFORE DELETE ON {jobs}
    FOR EACH ROW EXECUTE FUNCTION {schema}.jobs_keep_ledger();

-- New jobs wake idle daemons at once instead of at the next poll.
CREATE FUNCTION {schema}.jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('backfilld_jobs', NEW.name);
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE OF requested_state, mode ON {jobs}
    FOR EACH ROW EXECUTE FUNCTION {schema}.jobs_notify();
