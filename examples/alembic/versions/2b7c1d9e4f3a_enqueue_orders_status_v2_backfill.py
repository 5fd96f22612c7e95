"""enqueue the backfilld job orders_status_v2_backfill (post-deploy)

Sets status_v2 = lower(status) on public.orders WHERE status_v2 IS NULL.

The column was added by the previous, schema-only revision (1a6b0c8d3e2f). This one changes no
row of orders: it only inserts the job row, committed with the migration. It is a dry run:
backfilld plans it and waits until a human approves it with
`backfilld execute orders_status_v2_backfill`. The later revision that adds NOT NULL (in a later
deploy) runs only after `backfilld wait orders_status_v2_backfill` succeeds.

A name runs once: backfill.jobs is a ledger, unique on name, and refuses DELETE, so downgrade()
cancels the job if it has not finished instead of deleting it.

Revision ID: 2b7c1d9e4f3a
Revises: 1a6b0c8d3e2f
Create Date: 2026-01-02 00:00:00
"""

from alembic import op

revision = "2b7c1d9e4f3a"
down_revision = "1a6b0c8d3e2f"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
INSERT INTO backfill.jobs (name, table_name, action, predicate, set_clause, mode)
VALUES ('orders_status_v2_backfill', 'public.orders', 'update',
        'status_v2 IS NULL', 'status_v2 = lower(status)', 'dry_run')
"""
    )


def downgrade() -> None:
    op.execute(
        """
UPDATE backfill.jobs SET requested_state = 'cancelled'
WHERE name = 'orders_status_v2_backfill'
  AND state NOT IN ('succeeded', 'failed', 'cancelled')
"""
    )
