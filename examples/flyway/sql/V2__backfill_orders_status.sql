-- Post-deploy migration: enqueue the backfilld job orders_status_v2_backfill
-- (status_v2 = lower(status) on public.orders WHERE status_v2 IS NULL).
--
-- The column was added by an earlier, schema-only migration (V1__add_orders_status_v2.sql). This
-- one changes no row of orders: it only inserts the job row, committed with this migration. It is
-- a dry run: backfilld plans it and waits until a human approves it with
-- `backfilld execute orders_status_v2_backfill`. The later migration that adds NOT NULL
-- (V3__orders_status_v2_not_null.sql, in a later deploy) runs only after
-- `backfilld wait orders_status_v2_backfill` succeeds.
--
-- A name runs once: backfill.jobs is a ledger, unique on name, and refuses DELETE. The undo
-- (U2__backfill_orders_status.sql) cancels the job instead of deleting it.
INSERT INTO backfill.jobs (name, table_name, action, predicate, set_clause, mode)
VALUES ('orders_status_v2_backfill', 'public.orders', 'update',
        'status_v2 IS NULL', 'status_v2 = lower(status)', 'dry_run');
