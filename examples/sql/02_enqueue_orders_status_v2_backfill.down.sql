-- Down: cancel the job if it has not finished. backfill.jobs is an execution ledger and refuses
-- DELETE, so down never deletes the row: it sets requested_state, and backfilld stops the job
-- within one batch (at once if no replica is running it). A finished job is left as it is.
-- Rows already changed stay changed: `backfilld revert orders_status_v2_backfill` restores them
-- from the job's archive. The name stays spent.
UPDATE backfill.jobs SET requested_state = 'cancelled'
WHERE name = 'orders_status_v2_backfill'
  AND state NOT IN ('succeeded', 'failed', 'cancelled');
