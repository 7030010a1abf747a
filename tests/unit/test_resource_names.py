"""images/{id} names: the canonical form passes as is, anything else gets
INVALID_ARGUMENT saying what to write instead."""

from __future__ import annotations

import pytest

from bms_image.common.convert import image_id_from_name
from bms_image.common.errors import InvalidArgument

CANONICAL = "635e3f9c-41bc-548f-87e3-da2a1bb02313"


def test_the_canonical_form_passes() -> None:
    assert image_id_from_name(f"images/{CANONICAL}") == CANONICAL


@pytest.mark.parametrize(
    ("name", "says"),
    [
        (f"images/{CANONICAL.upper()}", f"canonical lower-case form: {CANONICAL}"),
        (f"images/{{{CANONICAL}}}", f"canonical lower-case form: {CANONICAL}"),
        ("images/centos", "needs a UUID id, got 'centos'"),
        (f"flavors/{CANONICAL}", "must be `images/{id}`"),
        ("", "must be `images/{id}`"),
    ],
)
def test_other_forms_say_what_to_write(name: str, says: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        image_id_from_name(name)
    assert says in refused.value.message
    assert refused.value.violations[0].field == "name"
