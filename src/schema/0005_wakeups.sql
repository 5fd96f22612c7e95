-- Wake idle replicas whenever a job may have become claimable: a new job, an operator request or
-- mode change, and a job handed back to 'pending' (a draining replica during a rolling deploy, a
-- rescued lease, a retried failure), which before waited for the next poll. Only real changes
-- notify, so a fenced write that repeats a value wakes nobody.
DROP TRIGGER jobs_notify ON {jobs};

CREATE TRIGGER jobs_notify_insert AFTER INSERT ON {jobs}
    FOR EACH ROW EXECUTE FUNCTION {schema}.jobs_notify();

CREATE TRIGGER jobs_notify_update AFTER UPDATE ON {jobs}
    FOR EACH ROW
    WHEN (OLD.requested_state IS DISTINCT FROM NEW.requested_state
          OR OLD.mode IS DISTINCT FROM NEW.mode
          OR (OLD.state IS DISTINCT FROM NEW.state AND NEW.state = 'pending'))
    EXECUTE FUNCTION {schema}.jobs_notify();
