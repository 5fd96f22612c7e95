# Post-deploy migration: enqueue the backfilld job orders_status_v2_backfill
# (status_v2 = lower(status) on public.orders WHERE status_v2 IS NULL).
#
# The column was added by the previous, schema-only migration (0001_add_orders_status_v2, an
# AddField of a nullable status_v2). This one changes no row of orders: it only inserts the job
# row, committed with the migration. It is a dry run: backfilld plans it and waits until a human
# approves it with `backfilld execute orders_status_v2_backfill`. The later migration that adds
# NOT NULL (in a later deploy) runs only after `backfilld wait orders_status_v2_backfill` succeeds.
#
# A name runs once: backfill.jobs is a ledger, unique on name, and refuses DELETE, so the reverse
# SQL cancels the job if it has not finished instead of deleting it.
from django.db import migrations

ENQUEUE = """
INSERT INTO backfill.jobs (name, table_name, action, predicate, set_clause, mode)
VALUES ('orders_status_v2_backfill', 'public.orders', 'update',
        'status_v2 IS NULL', 'status_v2 = lower(status)', 'dry_run')
"""

CANCEL = """
UPDATE backfill.jobs SET requested_state = 'cancelled'
WHERE name = 'orders_status_v2_backfill'
  AND state NOT IN ('succeeded', 'failed', 'cancelled')
"""


class Migration(migrations.Migration):
    dependencies = [
        ("orders", "0001_add_orders_status_v2"),
    ]

    operations = [
        migrations.RunSQL(ENQUEUE, reverse_sql=CANCEL),
    ]
