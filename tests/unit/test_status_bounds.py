"""A status must fit the client's trailer limit whatever the request quoted:
every text is cut by UTF-8 bytes, never inside a character."""

from __future__ import annotations

import urllib.parse

from bms_image.common.errors import FieldViolation, InvalidArgument
from bms_image.common.status import DETAIL_LIMIT, MESSAGE_LIMIT, bounded, to_rpc_status

UNICORNS = "🦄" * 5000  # 4 bytes each in UTF-8, 12 once percent-encoded


def test_texts_are_cut_by_bytes_on_a_character_boundary() -> None:
    cut = bounded(UNICORNS, DETAIL_LIMIT)
    assert len(cut.encode()) <= DETAIL_LIMIT
    assert cut.endswith("…") and set(cut[:-1]) == {"🦄"}
    assert bounded("short", DETAIL_LIMIT) == "short"


def test_the_worst_status_stays_under_the_clients_soft_trailer_limit() -> None:
    error = InvalidArgument(
        "INVALID_FIELD",
        f"flavors/{UNICORNS} is not a flavor",
        [FieldViolation(UNICORNS, UNICORNS) for _ in range(50)],
        {UNICORNS: UNICORNS},
    )
    status = to_rpc_status(error)
    assert len(status.message.encode()) <= MESSAGE_LIMIT
    grpc_message = urllib.parse.quote(status.message, safe="")  # as it travels
    details_bin = len(status.SerializeToString()) * 4 // 3 + 4  # base64
    assert len(grpc_message) + details_bin < 8 * 1024
