"""replica_adapters.error: why a replica could not load the desired version of an adapter

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 12:00:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('replica_adapters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('error', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('replica_adapters', schema=None) as batch_op:
        batch_op.drop_column('error')
