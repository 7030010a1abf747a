"""SharingService: proto <-> domain, nothing more."""

from __future__ import annotations

from typing import Any

from google.protobuf import empty_pb2

from bms.image.v1 import image_pb2, sharing_pb2, sharing_pb2_grpc
from bms_image.common.context import current_caller
from bms_image.common.convert import enum_from_proto, image_id_from_name
from bms_image.common.errors import invalid_field
from bms_image.common.model import MemberStatus
from bms_image.images.domain.sharing import Sharing
from bms_image.images.grpc.convert import member_from_name, member_to_proto
from bms_image.images.grpc.rendering import RenderedImages

Context = Any


class SharingServicer(sharing_pb2_grpc.SharingServiceServicer):  # type: ignore[misc]
    def __init__(self, sharing: Sharing, rendered: RenderedImages) -> None:
        self._sharing = sharing
        self._rendered = rendered

    async def CreateImageMember(
        self, request: sharing_pb2.CreateImageMemberRequest, context: Context
    ) -> sharing_pb2.ImageMember:
        member = await self._sharing.share(
            current_caller(),
            image_id_from_name(request.parent, "parent"),
            request.member.member_project,
        )
        return member_to_proto(member)

    async def ListImageMembers(
        self, request: sharing_pb2.ListImageMembersRequest, context: Context
    ) -> sharing_pb2.ListImageMembersResponse:
        members, next_token = await self._sharing.list(
            current_caller(),
            image_id_from_name(request.parent, "parent"),
            request.page_size,
            request.page_token,
        )
        return sharing_pb2.ListImageMembersResponse(
            members=[member_to_proto(m) for m in members], next_page_token=next_token
        )

    async def GetImageMember(
        self, request: sharing_pb2.GetImageMemberRequest, context: Context
    ) -> sharing_pb2.ImageMember:
        image_id, project = member_from_name(request.name)
        return member_to_proto(await self._sharing.get(current_caller(), image_id, project))

    async def UpdateImageMember(
        self, request: sharing_pb2.UpdateImageMemberRequest, context: Context
    ) -> sharing_pb2.ImageMember:
        if list(request.update_mask.paths) != ["status"]:
            raise invalid_field("update_mask", "must be exactly `status`")
        image_id, project = member_from_name(request.member.name, "member.name")
        status = enum_from_proto(MemberStatus, request.member.status, "member.status")
        member = await self._sharing.answer(current_caller(), image_id, project, status)
        return member_to_proto(member)

    async def DeleteImageMember(
        self, request: sharing_pb2.DeleteImageMemberRequest, context: Context
    ) -> empty_pb2.Empty:
        image_id, project = member_from_name(request.name)
        await self._sharing.unshare(current_caller(), image_id, project)
        return empty_pb2.Empty()

    async def ReplicateImage(
        self, request: sharing_pb2.ReplicateImageRequest, context: Context
    ) -> image_pb2.Image:
        caller = current_caller()
        image = await self._sharing.replicate(
            caller, image_id_from_name(request.name), request.display_name, request.request_id
        )
        return self._rendered.message(caller, image)
