"""What operators watch of the catalog, for the metrics endpoint: images by
(status, visibility), and the quota each project uses (two GROUP BY queries)."""

from __future__ import annotations

from sqlalchemy import Connection, func, select

from bms_image.common.model import Visibility
from bms_image.images.adapters.rows import COUNTED_STATUSES, IMAGES


def inventory_of(connection: Connection) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    image = IMAGES.c
    by_status = connection.execute(
        select(image.status, image.visibility, func.count()).group_by(
            image.status, image.visibility
        )
    )
    by_project = connection.execute(
        select(image.owner_project, func.count())
        .where(
            image.visibility == Visibility.PRIVATE.value,
            image.status.in_(COUNTED_STATUSES),
        )
        .group_by(image.owner_project)
    )
    return (
        {(status, visibility): int(n) for status, visibility, n in by_status},
        {str(project): int(n) for project, n in by_project if project},
    )
