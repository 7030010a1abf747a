"""The API's timestamps: our integer conversion gives what protobuf's own
Timestamp.FromDatetime gives, for every kind of datetime we may hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import timestamp_pb2

from bms_image.common.convert import timestamp_to_proto as _timestamp


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 27, 13, 45, 1, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),  # before the epoch
        datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2020, 5, 5, 1, 2, 3, 4),  # naive: taken as UTC
    ],
)
def test_matches_protobuf(value: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    assert _timestamp(value) == expected


def test_none_stays_unset() -> None:
    assert _timestamp(None) is None
