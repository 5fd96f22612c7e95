-- Constraint migration: ships in a later deploy than 02, and runs only after
--     backfilld wait orders_status_v2_backfill
-- exits 0 (the job succeeded and no row up to its upper bound still matches its predicate).
-- The guard below refuses to run earlier, whatever the deploy pipeline does.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM backfill.jobs
                   WHERE name = 'orders_status_v2_backfill' AND state = 'succeeded' AND remaining = 0)
    THEN
        RAISE EXCEPTION 'orders_status_v2_backfill has not succeeded yet: run backfilld wait orders_status_v2_backfill first';
    END IF;
END $$;

-- NOT NULL without scanning the table under an ACCESS EXCLUSIVE lock: a NOT VALID check (brief
-- lock, no scan), validated under a lock that lets reads and writes go on, then SET NOT NULL,
-- which uses the validated check instead of scanning (PostgreSQL 12+). Run each statement in its
-- own transaction (psql without -1) so the validation does not hold the first statement's lock.
SET lock_timeout = '5s';
ALTER TABLE public.orders
    ADD CONSTRAINT orders_status_v2_not_null CHECK (status_v2 IS NOT NULL) NOT VALID;
ALTER TABLE public.orders VALIDATE CONSTRAINT orders_status_v2_not_null;
ALTER TABLE public.orders ALTER COLUMN status_v2 SET NOT NULL;
ALTER TABLE public.orders DROP CONSTRAINT orders_status_v2_not_null;
