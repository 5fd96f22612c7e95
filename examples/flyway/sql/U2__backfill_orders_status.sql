-- Undo of V2 (Flyway undo migrations need Flyway Teams/Enterprise; elsewhere run this by hand or
-- as a new versioned migration). Cancels the job if it has not finished. It never deletes the row:
-- backfill.jobs is an execution ledger and refuses DELETE. Rows already changed stay changed
-- (`backfilld revert orders_status_v2_backfill` restores them); the name stays spent.
UPDATE backfill.jobs SET requested_state = 'cancelled'
WHERE name = 'orders_status_v2_backfill'
  AND state NOT IN ('succeeded', 'failed', 'cancelled');
