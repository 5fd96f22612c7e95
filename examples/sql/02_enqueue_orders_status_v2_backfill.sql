-- Post-deploy migration: enqueue the backfill of orders.status_v2 with backfilld.
--
-- * The schema change stays schema-only, in the earlier migration 01_add_orders_status_v2.sql.
--   This migration changes no row of orders: it only INSERTs one job row into backfill.jobs,
--   committed with the migration's transaction. backfilld then sets status_v2 = lower(status)
--   in small, throttled, checkpointed batches, re-checking the predicate on every write.
-- * It is a dry run (mode 'dry_run'): backfilld counts the rows, stores samples and an EXPLAIN
--   in the job's plan, and waits. A human reads `backfilld status orders_status_v2_backfill` and
--   approves it with `backfilld execute orders_status_v2_backfill`.
-- * The later migration that adds NOT NULL (03_orders_status_v2_not_null.sql) runs only after
--   `backfilld wait orders_status_v2_backfill` succeeds: the job succeeded and no row is left.
-- * A name runs once (backfill.jobs is a ledger, unique on name): applying this again fails.
--   To redo the change, enqueue it under a new name in a new migration.
-- * status is assumed NOT NULL: lower(NULL) is NULL, so a row with a NULL status would stay
--   selected by the predicate (write coalesce(lower(status), 'unknown') if that can happen).
INSERT INTO backfill.jobs (name, table_name, action, predicate, set_clause, mode)
VALUES ('orders_status_v2_backfill', 'public.orders', 'update',
        'status_v2 IS NULL', 'status_v2 = lower(status)', 'dry_run');
