-- Schema migration (regular deploy): schema only, no data change. Adding a nullable column
-- without a default only touches the catalog. From this deploy on, the application writes
-- status_v2 on every INSERT and UPDATE of orders; the backfill (02) fills in the older rows.
ALTER TABLE public.orders ADD COLUMN status_v2 text;
