"""initial schema: images, tags, flavors, projects

Revision ID: 0001
Revises: 
Create Date: 2026-11-27 07:07:16.125603

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Create the catalog tables."""
    op.create_table('flavors',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('hardware_model', sa.String(length=64), nullable=False),
    sa.Column('cpu_cores', sa.Integer(), nullable=False),
    sa.Column('cpu_model', sa.String(length=128), nullable=False),
    sa.Column('memory_gib', sa.Integer(), nullable=False),
    sa.Column('local_disks', sa.String(length=128), nullable=False),
    sa.Column('local_disk_gb', sa.Integer(), nullable=False),
    sa.Column('evs_boot', sa.Boolean(), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('flavors', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_flavors_hardware_model'), ['hardware_model'], unique=False)

    op.create_table('images',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('display_name', sa.String(length=128), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('visibility', sa.String(length=16), nullable=False),
    sa.Column('owner_project', sa.String(length=64), nullable=True),
    sa.Column('os_type', sa.String(length=16), nullable=False),
    sa.Column('os_distro', sa.String(length=32), nullable=False),
    sa.Column('os_version', sa.String(length=32), nullable=False),
    sa.Column('architecture', sa.String(length=16), nullable=False),
    sa.Column('disk_format', sa.String(length=16), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('min_disk_gb', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('status_reason', sa.Text(), nullable=False),
    sa.Column('hardware_model', sa.String(length=64), nullable=False),
    sa.Column('plugins', sa.JSON(), nullable=False),
    sa.Column('source_server', sa.String(length=80), nullable=False),
    sa.Column('protected', sa.Boolean(), nullable=False),
    sa.Column('deprecated', sa.Boolean(), nullable=False),
    sa.Column('request_id', sa.String(length=36), nullable=True),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('owner_project', 'request_id', name='uq_images_owner_request')
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index('ix_images_model_seq', ['hardware_model', 'seq'], unique=False)
        batch_op.create_index('ix_images_owner_status', ['owner_project', 'status'], unique=False)
        batch_op.create_index('ix_images_visibility_seq', ['visibility', 'seq'], unique=False)

    op.create_table('projects',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('image_flavors',
    sa.Column('image_id', sa.String(length=36), nullable=False),
    sa.Column('flavor', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['flavor'], ['flavors.name'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('image_id', 'flavor')
    )
    with op.batch_alter_table('image_flavors', schema=None) as batch_op:
        batch_op.create_index('ix_image_flavors_flavor', ['flavor', 'image_id'], unique=False)

    op.create_table('image_tags',
    sa.Column('image_id', sa.String(length=36), nullable=False),
    sa.Column('tag', sa.String(length=64), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('image_id', 'tag')
    )
    with op.batch_alter_table('image_tags', schema=None) as batch_op:
        batch_op.create_index('ix_image_tags_tag', ['tag', 'image_id'], unique=False)



def downgrade() -> None:
    """Drop the catalog tables."""
    with op.batch_alter_table('image_tags', schema=None) as batch_op:
        batch_op.drop_index('ix_image_tags_tag')

    op.drop_table('image_tags')
    with op.batch_alter_table('image_flavors', schema=None) as batch_op:
        batch_op.drop_index('ix_image_flavors_flavor')

    op.drop_table('image_flavors')
    op.drop_table('projects')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index('ix_images_visibility_seq')
        batch_op.drop_index('ix_images_owner_status')
        batch_op.drop_index('ix_images_model_seq')

    op.drop_table('images')
    with op.batch_alter_table('flavors', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_flavors_hardware_model'))

    op.drop_table('flavors')
