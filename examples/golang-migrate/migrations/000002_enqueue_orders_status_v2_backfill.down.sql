-- Cancel the job if it has not finished. Never DELETE: backfill.jobs is an execution ledger and
-- refuses it. Rows already changed stay changed (`backfilld revert orders_status_v2_backfill`
-- restores them); the name stays spent.
UPDATE backfill.jobs SET requested_state = 'cancelled'
WHERE name = 'orders_status_v2_backfill'
  AND state NOT IN ('succeeded', 'failed', 'cancelled');
