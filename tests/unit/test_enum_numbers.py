"""enum_to_proto: every domain enum member gets its own API number."""

from __future__ import annotations

from bms.image.v1 import image_pb2, provisioning_pb2
from bms_image.common.model import ImageStatus
from bms_image.fleet.domain.servers import ProvisioningStage, ServerState
from bms_image.fleet.grpc.convert import enum_to_proto


def test_enums_of_different_types_with_the_same_text_keep_their_own_numbers() -> None:
    """StrEnum members with equal text are equal (and hash alike): a cache of
    numbers keyed by member alone would hand one type's number to the other."""
    assert ImageStatus.ACTIVE == ServerState.ACTIVE  # the trap
    assert enum_to_proto(ImageStatus.ACTIVE) == image_pb2.IMAGE_STATUS_ACTIVE
    assert enum_to_proto(ServerState.ACTIVE) == provisioning_pb2.SERVER_STATE_ACTIVE
    assert enum_to_proto(ProvisioningStage.ACTIVE) == provisioning_pb2.PROVISIONING_STAGE_ACTIVE
