"""Hostile and malformed input, property-based (hypothesis): for every RPC of
the three services, requests built from the request's own descriptor, every
field of its proto type but hostile content -- huge strings (up to 64 Ki
characters), NUL, RTL and zero-width marks, emoji, combining characters,
`%00`, `../` path traversal, `images/` with garbage ids, very long resource
names, negative and extreme numbers, undefined enum numbers, forged and
tampered page tokens (huge ones too), filters that try SQL injection (quotes,
`OR 1=1`, `; DROP TABLE`, unbalanced quotes and parentheses, deep nesting,
too many conditions), YAML bombs in user data (aliases, depth, node count,
unreadable values) and SSH key lines of megabytes. Two
requests in three are a valid request of the RPC (the owner's, on real
things: an active shared image, a queued one, a server, the public catalog)
with one to three fields, nested ones too, given hostile values, so that
they get past the first check and reach the deep code paths; the third is
hostile throughout. Each example sends one such request to every RPC of a
service, as one of owner, member, other project or admin.

What must hold for every request: the status is a documented client error
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE,
ALREADY_EXISTS, PERMISSION_DENIED, RESOURCE_EXHAUSTED, plus ABORTED for a
stale `etag` and DATA_LOSS for a wrong upload `sha256`, both documented) or
OK where the request happens to be valid -- never INTERNAL or UNKNOWN, never
a hang (every call has a deadline; DEADLINE_EXCEEDED fails the test) -- and
every error is a proper rich status (support.errors.decode: one ErrorInfo, a
BadRequest for INVALID_ARGUMENT, a QuotaFailure for RESOURCE_EXHAUSTED). After
every example the service still answers (health, and a create/get/list
round trip by a new project).

Each property test runs on one service of its own, on SQLite and on
PostgreSQL (the `database_url` fixture). Raw bytes that are no protobuf at
all, and messages over `max_message_bytes`, are tested too.

Bugs found here are pinned by the xfail(strict=True) tests at the end of the
file; the property tests tolerate exactly those signatures (KNOWN_BUGS)
so that they keep guarding everything else. When a bug is fixed, its xfail
test XPASSes (a failure, being strict): remove the xfail marker and the
signature together. One tolerated signature is grpcio's, not ours
(CLIENT_QUIRKS).
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from reliability_support import (
    CALL_TIMEOUT,
    CENTOS,
    S4_FLAVOR,
    SERVICE_BY_NAME,
    Metadata,
    Outcome,
    answer,
    call_raw,
    call_rpc,
    create_active,
    create_private,
    deploy,
    deploy_request,
    eventually,
    every_method,
    identity,
    member_name,
    message_class,
    method_by_id,
    private_image,
    public_image,
    random_payload,
    rpc_id,
    serving,
    share,
    still_serving,
    stop_server,
    text_of,
    upload,
    upload_requests,
)

from bms.image.v1 import image_pb2, provisioning_pb2, sharing_pb2
from bms_image.common.config import Settings
from bms_image.common.serving import RunningService
from support.errors import Code, decode
from support.services import ImageStub, ProvisioningStub, SharingStub, make_settings

#: The client errors the API documents; OK where the request is valid after all.
ALLOWED = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.FAILED_PRECONDITION,
        Code.OUT_OF_RANGE,
        Code.ALREADY_EXISTS,
        Code.PERMISSION_DENIED,
        Code.RESOURCE_EXHAUSTED,
        Code.ABORTED,  # a stale or made-up `etag` (UpdateImage, DeleteImage)
        Code.DATA_LOSS,  # an upload whose declared `sha256` is not its content's
    }
)

EXAMPLES_PER_SERVICE = 40  # hypothesis examples; each calls every RPC of the service once
PROPERTY = hypothesis_settings(
    max_examples=EXAMPLES_PER_SERVICE,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """The shared `service` fixture, on SQLite and on PostgreSQL."""
    return make_settings(tmp_path, database_url=database_url)


# -- what the hostile requests aim at --------------------------------------------------------


@dataclass
class Targets:
    """Real things for hostile requests to hit, beside garbage."""

    md: dict[str, Metadata]  # owner, member, other, admin
    projects: dict[str, str]
    active: str  # an ACTIVE private image of the owner, shared with `member` (accepted)
    queued: str  # a QUEUED private image of the owner
    victim: str  # another one, for the destructive RPCs
    server: str  # an ACTIVE server of the owner
    page_token: str  # a real next_page_token of the owner's ListImages (empty filter)
    backend: str
    service: RunningService
    strategies: dict[str, st.SearchStrategy[Any]] = dataclasses.field(default_factory=dict)

    def fresh_identity(self) -> Metadata:
        """A project of its own (its quota untouched by earlier examples)."""
        return identity(self.service, f"alive-{uuid.uuid4().hex[:12]}")

    def names(self) -> list[str]:
        return [
            self.active, self.queued, self.server, CENTOS, S4_FLAVOR,
            member_name(self.active, self.projects["member"]),
            member_name(self.active, self.projects["owner"]),
            f"images/{uuid.UUID(int=0)}", f"servers/{uuid.UUID(int=0)}",
        ]  # fmt: skip


@pytest.fixture
async def targets(service: RunningService, channel: grpc.aio.Channel, database_url: str) -> Targets:
    suffix = uuid.uuid4().hex[:8]
    projects = {role: f"{role}-{suffix}" for role in ("owner", "member", "other", "admin")}
    md = {role: identity(service, projects[role], admin=role == "admin") for role in projects}
    images = ImageStub(channel)
    sharing = SharingStub(channel)
    provisioning = ProvisioningStub(channel)
    active = await create_active(images, md["owner"], random_payload(20_000))
    await share(sharing, md["owner"], active.name, projects["member"])
    await answer(
        sharing,
        md["member"],
        member_name(active.name, projects["member"]),
        sharing_pb2.MEMBER_STATUS_ACCEPTED,
    )
    queued = await create_private(images, md["owner"])
    victim = await create_private(images, md["owner"], display_name="victim")
    server = await deploy(provisioning, md["owner"])
    page = await images.ListImages(
        image_pb2.ListImagesRequest(page_size=1), metadata=md["owner"], timeout=CALL_TIMEOUT
    )
    assert page.next_page_token
    backend = "postgres" if database_url.startswith("postgresql") else "sqlite"
    return Targets(
        md,
        projects,
        active.name,
        queued.name,
        victim.name,
        server,
        page.next_page_token,
        backend,
        service,
    )


# -- hostile values --------------------------------------------------------------------------

HOSTILE_STRINGS = [
    "", " ", "\x00", "a\x00b", "%00", "%2e%2e%2f", "../", "../../../../etc/passwd",
    "..\\..\\windows\\win.ini", "/", "//", "./.", "\r\n", "\t", "\x1b[31mred", "\x7f",
    "\u202e", "\u200f\u200e", "\u200b", "\ufeff", "\u0000\u202e", "🦄💥", "👩‍👩‍👧‍👦",
    "e" + "\u0301" * 64, "\U0010ffff", "\ufffe\uffff", "Ω≈ç√∫", "ﷺ", "İı",
    "\U0001d573\U0001d58a\U0001d591\U0001d591\U0001d594",
    "' OR 1=1 --", '" OR ""="', "'; DROP TABLE images; --", "Robert'); DROP TABLE images;--",
    "%", "_", "*", "\\", "\\\\", "'", '"', "`", "${jndi:ldap://x/a}", "{{7*7}}",
    "<script>alert(1)</script>", "null", "None", "NaN", "-1", "0x7fffffff", "1e309",
    "images/", "images/..", "images/../../etc/passwd", "images/%00", "images/\x00",
    "images/*", "images/ ", "images//", "images/-1", "images/0",
    f"images/{str(uuid.UUID(int=1)).upper()}", f"images/{{{uuid.UUID(int=1)}}}",
    f"images/{uuid.UUID(int=1)}/", f"images/{uuid.UUID(int=1)}/members/",
    f"images/{uuid.UUID(int=1)}/members/../../x", f"images/{uuid.UUID(int=1).hex}",
    "flavors/", "flavors/..", "flavors/\x00", "flavors/physical.s4.large/../x",
    "servers/", "servers/../images", f"servers/{uuid.UUID(int=2)}/",
    "projects/alpha/images/x", "IMAGES/x", "images\\x",
]  # fmt: skip

HUGE = st.sampled_from([300, 1025, 4096, 20_000, 65_536]).flatmap(
    lambda size: st.sampled_from(["x", "é", "🦄", "\u202e", "'", "(", "/", "\x00"]).map(
        lambda unit: unit * size
    )
)


def _hostile_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(HOSTILE_STRINGS),
        st.text(max_size=80),
        HUGE,
        st.builds(lambda a, b: a + b, st.sampled_from(HOSTILE_STRINGS), st.text(max_size=20)),
    )


HOSTILE = _hostile_text()


def resource_names(targets: Targets) -> st.SearchStrategy[str]:
    prefixes = st.sampled_from(["images/", "servers/", "flavors/", ""])
    real = st.sampled_from(targets.names())
    return st.one_of(
        real,
        real,
        st.builds(lambda p, t: p + t, prefixes, HOSTILE),
        st.builds(lambda t: f"{targets.active}/members/{t}", HOSTILE),
        st.builds(lambda r, t: r + t, real, HOSTILE),
        st.builds(lambda: f"images/{uuid.uuid4()}"),
        st.builds(lambda n: "images/" + "a" * n, st.integers(100, 65_536)),
        HOSTILE,
    )


FILTER_FIELDS = [
    "type", "flavor", "os_type", "os_distro", "os_version", "architecture", "status",
    "name", "tag", "owner_project", "protected", "deprecated", "member_status",
]  # fmt: skip
SQL_FILTERS = [
    "name = \"x' OR 1=1 --\"", "name = x' OR '1'='1", "; DROP TABLE images",
    "type = public; DROP TABLE images; --", 'name = "a" OR 1=1', "name = a OR 1=1",
    'owner_project = "" OR owner_project != ""', 'name = "', "name = 'unbalanced",
    '"', "'", "(", ")", "(((((", "(" * 1000, ")" * 1000, "(type = public)",
    "((type = public) AND (os_type = linux))", "type = public AND", "AND", "AND AND",
    "= =", "!=", "type == public", "type = public OR type = private", "NOT type = public",
    "-type = public", "type = public AND " * 40, 'name = "\\"', 'name = "\\', 'tag = "%"',
    "name = %*", "name = _*", "owner_project = *", "name = *", "name = \\*",
    'name = "' + "a" * 2000 + '"', "type = PUBLIC", "member_status = pending",
    "flavor != physical.s4.large", "flavor = flavors/../x", "deprecated = maybe",
    "protected = 1", "status = deleted", "type = shared AND type = private",
    "name = x\x00", "name = \u202etxt.exe", 'name = "🦄"', "tag = " + "t" * 1020,
    "os_distro = centos UNION SELECT * FROM images",
    "owner_project = alpha' UNION SELECT token_secret --",
    " AND ".join(["os_distro != x"] * 33), " AND ".join(["tag = t"] * 32),
    '"' + "\\\"" * 500, "name = \"" + "\\" * 1000,
]  # fmt: skip


def _filters() -> st.SearchStrategy[str]:
    condition = st.builds(
        lambda field, op, value: f"{field} {op} {value}",
        st.one_of(st.sampled_from(FILTER_FIELDS), HOSTILE),
        st.sampled_from(["=", "!=", "==", "<", ":", "", "= ="]),
        st.one_of(st.sampled_from(["public", "linux", "active", "true", "x*", '"a b"']), HOSTILE),
    )
    joined = st.builds(
        lambda parts, glue: glue.join(parts),
        st.lists(condition, min_size=1, max_size=5),
        st.sampled_from([" AND ", " and ", " OR ", " ", ") AND (", "  AND  "]),
    )
    nested = st.builds(
        lambda depth, text: "(" * depth + text + ")" * depth, st.integers(1, 600), joined
    )
    return st.one_of(st.just(""), st.sampled_from(SQL_FILTERS), joined, nested, HOSTILE)


FILTERS = _filters()


def page_tokens(targets: Targets) -> st.SearchStrategy[str]:
    token = targets.page_token

    def tampered(position: int, replacement: str) -> str:
        index = position % len(token)
        return token[:index] + replacement + token[index + 1 :]

    return st.one_of(
        st.just(""),
        st.just(token),
        st.builds(tampered, st.integers(0, 10_000), st.sampled_from(list("AaZz09-_=+/."))),
        st.builds(lambda n: token[: n % len(token)], st.integers(0, 10_000)),
        st.builds(lambda extra: token + extra, HOSTILE),
        st.binary(max_size=48).map(
            lambda raw: __import__("base64").urlsafe_b64encode(raw).decode()
        ),
        st.builds(lambda n: token * n, st.integers(2, 2000)),
        st.builds(lambda n: "A" * n, st.sampled_from([513, 65_536, 1_000_000])),
        HOSTILE,
    )


INT32 = st.one_of(
    st.sampled_from([0, 1, -1, 2, 50, 1000, 1001, 1024, 1025, 65_536, 2**31 - 1, -(2**31)]),
    st.integers(-(2**31), 2**31 - 1),
)
INT64 = st.one_of(
    st.sampled_from([0, 1, -1, 4096, 20_000, 2**31, 2**40, 2**63 - 1, -(2**63)]),
    st.integers(-(2**63), 2**63 - 1),
)
SSH_KEYS = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq1 x", "ssh-rsa AAAA\x00", "ssh-ed25519 " + "A" * 5000,
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n#x",
    # A valid key whose line is over 16 KiB, and a huge one of garbage base64.
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
    + "c" * 17_000,
    "ssh-rsa " + "QUFBQ" * 200_000 + "=",
]  # fmt: skip


def _alias_bomb(levels: int = 9) -> str:
    lines = ["#cloud-config", "a0: &a0 [" + ", ".join(['"lol"'] * 9) + "]"]
    lines += [f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 9) + "]" for n in range(1, levels)]
    return "\n".join([*lines, "write_files:", "- path: /x", f"  content: *a{levels - 1}"]) + "\n"


USER_DATA = [
    "#cloud-config\nwrite_files:\n- path: /etc/../../x\n  content: a\n",
    "#cloud-config\nwrite_files:\n- path: /etc/\x00x\n  content: a\n",
    "#cloud-config\nwrite_files:\n- path: ../x\n",
    "#cloud-config\nwrite_files: [1, 2]\n",
    "#cloud-config\nwrite_files: {path: /x}\n",
    "#cloud-config\n!!python/object/apply:os.system ['true']\n",
    "#cloud-config\na: &a [*a, *a]\nb: [*a, *a, *a]\n",
    "#cloud-config\n" + "- " * 200 + "x\n",
    "#cloud-config\n\t: :\n",
    "#cloud-config\n" + "[" * 3000,
    "#cloud-config\nwrite_files: " + "{a: " * 2000,
    "#!/bin/sh\nrm -rf /\n",
    _alias_bomb(),
    "#cloud-config\nwrite_files:\n- &f {path: /a, content: b}\n- *f\n",
    "#cloud-config\n" + "".join(" " * n + f"k{n}:\n" for n in range(100)),
    "#cloud-config\npad: [" + ",".join(["1"] * 12_000) + "]\n",
    "#cloud-config\nn: " + "9" * 5000 + "\n",
    "#cloud-config\nwhen: 2001-13-45\n",
    "#cloud-config\n!!int \n",
    "#cloud-config\nwrite_files:\n- path: /x\n  content: !!binary zz\n",
]  # fmt: skip


def string_strategy(field: FieldDescriptor, targets: Targets) -> st.SearchStrategy[str]:
    name = field.name
    if name in ("name", "parent", "image", "source_server", "flavor"):
        return resource_names(targets)
    if name == "filter":
        return FILTERS
    if name == "page_token":
        return page_tokens(targets)
    if name in ("request_id", "etag"):
        return st.one_of(st.builds(lambda: str(uuid.uuid4())), st.just('"1"'), HOSTILE)
    if name == "sha256":
        return st.one_of(st.text("0123456789abcdef", min_size=64, max_size=64), HOSTILE)
    if name == "member_project":
        return st.one_of(st.sampled_from(list(targets.projects.values())), HOSTILE)
    if name == "name_prefix":
        return st.one_of(st.sampled_from(["web", "a", "x-1", "a" * 48, "a" * 49]), HOSTILE)
    if name == "ssh_public_key":
        return st.one_of(st.sampled_from(SSH_KEYS), HOSTILE)
    if name == "user_data":
        return st.one_of(st.sampled_from(USER_DATA), HOSTILE)
    if name == "hardware_model":
        return st.one_of(st.just("s4-2288h-v5"), HOSTILE)
    if name in ("os_distro", "os_version", "version"):
        return st.one_of(st.sampled_from(["centos", "7.6", "0.7.9"]), HOSTILE)
    return HOSTILE


UPDATE_PATHS = ["display_name", "description", "tags", "min_disk_gb", "protected", "status"]


def field_strategy(field: FieldDescriptor, targets: Targets, depth: int) -> st.SearchStrategy[Any]:
    """A value of the field's proto type, hostile in content."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        single: st.SearchStrategy[Any] = string_strategy(field, targets)
    elif kind == FieldDescriptor.TYPE_BYTES:
        single = st.one_of(
            st.binary(max_size=64), st.builds(random_payload, st.integers(0, 70_000))
        )
    elif kind in (
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SFIXED32,
    ):
        single = INT32
    elif kind in (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
    ):
        single = INT64
    elif kind == FieldDescriptor.TYPE_BOOL:
        single = st.booleans()
    elif kind == FieldDescriptor.TYPE_ENUM:
        defined = [value.number for value in field.enum_type.values]
        single = st.one_of(st.sampled_from(defined), st.integers(-(2**31), 2**31 - 1))
    elif kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        single = st.floats(allow_nan=True, allow_infinity=True, width=32)
    elif kind == FieldDescriptor.TYPE_MESSAGE:
        single = message_strategy(field.message_type, targets, depth + 1)
    else:
        raise AssertionError(f"no strategy for {field.full_name} of type {kind}")
    if field.is_repeated:
        return st.lists(single, max_size=12 if field.name in ("tags", "data_disks_gb") else 4)
    return single


def message_strategy(
    descriptor: Descriptor, targets: Targets, depth: int = 0
) -> st.SearchStrategy[Message]:
    """A message of this type: each field left unset or given a hostile value."""
    cls = message_class(descriptor)
    if descriptor.full_name == "google.protobuf.FieldMask":
        paths = st.lists(st.one_of(st.sampled_from(UPDATE_PATHS), HOSTILE), max_size=4)
        return st.builds(lambda p: field_mask_pb2.FieldMask(paths=p), paths)
    if descriptor.full_name == "google.protobuf.Timestamp":
        return st.builds(
            lambda s, n: timestamp_pb2.Timestamp(seconds=s, nanos=n),
            st.integers(-62_135_596_800, 253_402_300_799),
            st.integers(0, 999_999_999),
        )
    if depth > 2:
        return st.just(cls())
    fields = {
        field.name: st.one_of(st.none(), field_strategy(field, targets, depth))
        for field in descriptor.fields
    }

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            if value is not None:
                _set(message, descriptor.fields_by_name[name], value)
        return message

    return st.fixed_dictionaries(fields).map(build)


def requests_for(method: MethodDescriptor, targets: Targets) -> st.SearchStrategy[Any]:
    """One request, or a list of them for the client stream (built once per
    targets: building and validating strategies costs more than drawing)."""
    cached = targets.strategies.get(method.full_name)
    if cached is None:
        cached = targets.strategies[method.full_name] = _requests_for(method, targets)
    return cached


def baseline(rpc: str, t: Targets) -> Any:
    """A valid request of each RPC (its owner's), for hostile values to be
    put into one field or a few: so that they reach past the first check."""
    image, sharing, provisioning = image_pb2, sharing_pb2, provisioning_pb2
    member = member_name(t.active, t.projects["member"])
    data = random_payload(5000)
    requests: dict[str, Any] = {
        "ImageService.ListImages": image.ListImagesRequest(
            page_size=10, filter="type = private AND os_type = linux"
        ),
        "ImageService.GetImage": image.GetImageRequest(name=t.active),
        "ImageService.CreateImage": image.CreateImageRequest(
            image=private_image(tags=["a", "b"], description="d"), request_id=str(uuid.uuid4())
        ),
        "ImageService.UpdateImage": image.UpdateImageRequest(
            image=image.Image(name=t.queued, description="d", tags=["x"], min_disk_gb=50),
            update_mask=field_mask_pb2.FieldMask(paths=["description", "tags"]),
        ),
        "ImageService.DeleteImage": image.DeleteImageRequest(name=t.victim, etag='"1"'),
        "ImageService.DeprecateImage": image.DeprecateImageRequest(name=t.victim),
        "ImageService.UploadImageData": [
            image.UploadImageDataRequest(
                metadata=image.UploadImageDataMetadata(
                    name=t.queued, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
                )
            ),
            image.UploadImageDataRequest(chunk=data),
        ],
        "ImageService.DownloadImageData": image.DownloadImageDataRequest(name=t.active, offset=1),
        "SharingService.CreateImageMember": sharing.CreateImageMemberRequest(
            parent=t.active, member=sharing.ImageMember(member_project="newcomer")
        ),
        "SharingService.ListImageMembers": sharing.ListImageMembersRequest(
            parent=t.active, page_size=10
        ),
        "SharingService.GetImageMember": sharing.GetImageMemberRequest(name=member),
        "SharingService.UpdateImageMember": sharing.UpdateImageMemberRequest(
            member=sharing.ImageMember(name=member, status=sharing.MEMBER_STATUS_ACCEPTED),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        "SharingService.DeleteImageMember": sharing.DeleteImageMemberRequest(
            name=member_name(t.active, "nobody")
        ),
        "SharingService.ReplicateImage": sharing.ReplicateImageRequest(
            name=t.active, display_name="copy", request_id=str(uuid.uuid4())
        ),
        "ProvisioningService.ListFlavors": provisioning.ListFlavorsRequest(page_size=2),
        "ProvisioningService.GetFlavor": provisioning.GetFlavorRequest(name=S4_FLAVOR),
        "ProvisioningService.CreateServers": provisioning.CreateServersRequest(
            flavor=S4_FLAVOR,
            image=CENTOS,
            count=1,
            name_prefix="web",
            ssh_public_key=SSH_KEYS[-1].split("\n")[0],
            user_data=USER_DATA[0].replace("../../", ""),
            data_disks_gb=[1],
        ),
        "ProvisioningService.GetServer": provisioning.GetServerRequest(name=t.server),
        "ProvisioningService.ListServers": provisioning.ListServersRequest(page_size=5),
        "ProvisioningService.StartServer": provisioning.StartServerRequest(name=t.server),
        "ProvisioningService.StopServer": provisioning.StopServerRequest(name=t.server),
        "ProvisioningService.DeleteServer": provisioning.DeleteServerRequest(
            name=f"servers/{uuid.uuid4()}"
        ),
        "ProvisioningService.ReinstallServer": provisioning.ReinstallServerRequest(
            name=t.server, image=CENTOS, user_data="#!/bin/sh\ntrue\n"
        ),
        "ProvisioningService.WatchServer": provisioning.WatchServerRequest(name=t.server),
        "ProvisioningService.InjectNetworkFault": provisioning.InjectNetworkFaultRequest(
            name=t.server
        ),
    }
    return requests[rpc]


def leaf_paths(descriptor: Descriptor, depth: int = 0) -> list[tuple[FieldDescriptor, ...]]:
    """Every field of a message, nested messages' fields too (2 levels)."""
    paths: list[tuple[FieldDescriptor, ...]] = []
    for field in descriptor.fields:
        paths.append((field,))
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated and depth < 1:
            paths += [(field, *rest) for rest in leaf_paths(field.message_type, depth + 1)]
    return paths


def mutated(
    method: MethodDescriptor, targets: Targets, base: Message
) -> st.SearchStrategy[Message]:
    """`base` with one to three of its fields given hostile values."""
    paths = leaf_paths(method.input_type)
    values = {path: field_strategy(path[-1], targets, len(path)) for path in paths}

    @st.composite
    def draw(draw_value: st.DrawFn) -> Message:
        message = type(base)()
        message.CopyFrom(base)
        for path in draw_value(st.lists(st.sampled_from(paths), min_size=1, max_size=3)):
            holder = message
            for field in path[:-1]:
                holder = getattr(holder, field.name)
            _set(holder, path[-1], draw_value(values[path]))
        return message

    return draw()


def _set(message: Message, field: FieldDescriptor, value: Any) -> None:
    if field.is_repeated:
        target = getattr(message, field.name)
        del target[:]
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _requests_for(method: MethodDescriptor, targets: Targets) -> st.SearchStrategy[Any]:
    """Two thirds of the time a valid request with a few hostile fields, else
    a request made of hostile values only."""
    single = message_strategy(method.input_type, targets)
    base = baseline(rpc_id(method), targets)
    if not method.client_streaming:
        return st.one_of(mutated(method, targets, base), mutated(method, targets, base), single)
    upload = image_pb2.UploadImageDataRequest
    well_started = st.builds(
        lambda meta, chunks: [upload(metadata=meta), *(upload(chunk=c) for c in chunks)],
        mutated(method, targets, base[0]).map(lambda request: request.metadata),
        st.lists(st.builds(random_payload, st.integers(0, 8192)), min_size=1, max_size=3),
    )
    return st.one_of(well_started, well_started, st.lists(single, max_size=4))


# -- judging an outcome ---------------------------------------------------------------------


@dataclass
class Sent:
    rpc: str
    caller: str
    request: Any  # a message, or a list of them

    def strings(self) -> list[str]:
        """Every string field value of the request(s)."""
        found: list[str] = []
        messages = self.request if isinstance(self.request, list) else [self.request]
        for message in messages:
            _collect_strings(message, found)
        return found

    def __str__(self) -> str:
        messages = self.request if isinstance(self.request, list) else [self.request]
        text = text_of(messages)
        return f"{self.rpc} as {self.caller}: {text[:600]}{'...' if len(text) > 600 else ''}"


def _collect_strings(message: Message, found: list[str]) -> None:
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        for item in values:
            if field.type == FieldDescriptor.TYPE_STRING:
                found.append(item)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                _collect_strings(item, found)


#: Known bugs, each pinned by an xfail(strict=True) test below: bug id ->
#: does this (request, outcome) show it. Remove an entry with its xfail.
KNOWN_BUGS: dict[str, Callable[[Sent, Outcome, str], bool]] = {}


def _grpc_client_write_race(sent: Sent, outcome: Outcome, backend: str) -> bool:
    """Not the service's: when the server refuses a client stream after its
    first message while the client is still writing the next ones, grpcio's
    aio client sometimes reports its own INTERNAL "Internal error from Core"
    instead of the server's status (grpc/grpc#36066). The service's own
    INTERNAL says "internal error; the service logged it"."""
    return (
        outcome.code == Code.INTERNAL
        and outcome.details == "Internal error from Core"
        and sent.rpc == "ImageService.UploadImageData"
    )


#: Client-library behaviour the property tests must not blame on the service.
CLIENT_QUIRKS: dict[str, Callable[[Sent, Outcome, str], bool]] = {
    "grpc-aio-client-write-race": _grpc_client_write_race,
}


def known_bug(sent: Sent, outcome: Outcome, backend: str) -> str | None:
    for bug, shows in (KNOWN_BUGS | CLIENT_QUIRKS).items():
        if shows(sent, outcome, backend):
            return bug
    return None


def problems_of(sent: Sent, outcome: Outcome, backend: str) -> list[str]:
    """What is wrong with how the service answered `sent` (nothing, ideally)."""
    if known_bug(sent, outcome, backend):
        return []
    return _problems_of(sent, outcome, backend)


def _problems_of(sent: Sent, outcome: Outcome, backend: str) -> list[str]:
    if outcome.code not in ALLOWED:
        return [f"{outcome.code.name}: {outcome.details[:300]!r} for {sent}"]
    if outcome.error is not None:
        try:
            decode(outcome.error)
        except (AssertionError, ValueError) as broken:
            return [f"{outcome.code.name} is not a proper rich status ({broken}) for {sent}"]
    return []


async def hurl(
    channel: grpc.aio.Channel, method: MethodDescriptor, targets: Targets, caller: str, request: Any
) -> list[str]:
    sent = Sent(rpc_id(method), caller, request)
    outcome = await call_rpc(channel, method, request, targets.md[caller], max_messages=3)
    return problems_of(sent, outcome, targets.backend)


# -- the properties ----------------------------------------------------------------------------

CALLERS = st.sampled_from(["owner", "owner", "member", "other", "admin"])


@pytest.mark.parametrize("service_name", list(SERVICE_BY_NAME))
@PROPERTY
@given(data=st.data())
async def test_hostile_requests_get_client_errors(
    service_name: str, channel: grpc.aio.Channel, targets: Targets, data: st.DataObject
) -> None:
    """Each example sends one hostile request to every RPC of the service,
    then checks the service still serves (health and a real round trip).
    Everything is drawn before the first call and nothing raises before the
    end, so that a replayed example draws exactly what it drew before."""
    plan = [
        (
            method,
            data.draw(CALLERS, label=f"{method.name} caller"),
            data.draw(requests_for(method, targets), label=f"{method.name} request"),
        )
        for method in SERVICE_BY_NAME[service_name].methods
    ]
    problems: list[str] = []
    for method, caller, request in plan:
        problems += await hurl(channel, method, targets, caller, request)
    try:
        await still_serving(channel, targets.fresh_identity())
    except (AssertionError, grpc.aio.AioRpcError) as error:
        problems.append(f"the service no longer serves: {error!r}")
    assert not problems, "\n".join(problems)


# -- bytes that are no protobuf at all ------------------------------------------------------------


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _bad_utf8(descriptor: Descriptor, depth: int = 0) -> bytes:
    """A body whose first string field (looked for in nested messages too)
    holds invalid UTF-8, which proto3 refuses to parse."""
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            return _varint(field.number << 3 | 2) + b"\x02\xc3\x28"
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE and depth < 2:
            inner = _bad_utf8(field.message_type, depth + 1)
            if inner:
                return _varint(field.number << 3 | 2) + _varint(len(inner)) + inner
    return b""


def garbage_for(method: MethodDescriptor) -> dict[str, bytes]:
    """Bodies no parser accepts as the method's request."""
    garbage = {
        "corrupt wire type": b"\xff\xff\xff\xff",
        "truncated varint": b"\x08\x80",
        "length past the end": b"\x0a\xff\xff\xff\xff\x0f",
        "unterminated group": b"\x0b",
        "invalid UTF-8 in a string": _bad_utf8(method.input_type),
    }
    return {kind: payload for kind, payload in garbage.items() if payload}


async def test_garbage_bytes_never_succeed_nor_break_the_service(
    channel: grpc.aio.Channel, targets: Targets
) -> None:
    """Every RPC, each kind of unparsable body, with and without a token: no
    success, no hang, and the service serves on."""
    problems: list[str] = []
    for method in every_method():
        for kind, payload in garbage_for(method).items():
            for md in (targets.md["owner"], ()):
                outcome = await call_raw(channel, method, payload, md)
                if outcome.code in (Code.OK, Code.DEADLINE_EXCEEDED):
                    problems.append(f"{rpc_id(method)} {kind}: {outcome.code.name}")
    await still_serving(channel, targets.md["owner"])
    assert not problems, "\n".join(problems)


async def test_garbage_bytes_are_invalid_argument(
    channel: grpc.aio.Channel, targets: Targets
) -> None:
    """A body that is no protobuf is the client's fault: INVALID_ARGUMENT with
    a token (a token-less caller may get UNAUTHENTICATED instead)."""
    problems: list[str] = []
    for method in every_method():
        for kind, payload in garbage_for(method).items():
            with_token = await call_raw(channel, method, payload, targets.md["owner"])
            if with_token.code != Code.INVALID_ARGUMENT:
                problems.append(f"{rpc_id(method)} {kind}: {with_token.code.name}")
            anonymous = await call_raw(channel, method, payload)
            if anonymous.code not in (Code.UNAUTHENTICATED, Code.INVALID_ARGUMENT):
                problems.append(f"{rpc_id(method)} {kind} without a token: {anonymous.code.name}")
    assert not problems, "\n".join(problems[:10]) + f"\n... {len(problems)} in all"


def parses(method: MethodDescriptor, payload: bytes) -> bool:
    try:
        message_class(method.input_type).FromString(payload)
    except DecodeError:
        return False
    return True


@PROPERTY
@given(payload=st.binary(max_size=512), method_index=st.integers(0, len(every_method()) - 1))
async def test_random_bytes_as_requests(
    channel: grpc.aio.Channel, targets: Targets, payload: bytes, method_index: int
) -> None:
    """Random bytes often parse (as unknown fields): then the answer is a
    client error or OK like for any request. Bytes that do not parse are
    the bug test_garbage_bytes_are_invalid_argument pins (UNKNOWN, or
    INTERNAL inside a client stream): tolerated here, and only for them."""
    method = every_method()[method_index]
    outcome = await call_raw(channel, method, payload, targets.md["owner"])
    if not parses(method, payload) and outcome.code in (Code.UNKNOWN, Code.INTERNAL):
        return
    assert outcome.code in ALLOWED, (
        f"{rpc_id(method)} {payload!r}: {outcome.code.name} {outcome.details}"
    )


# -- messages over max_message_bytes ----------------------------------------------------------


async def test_oversized_messages_are_refused_and_the_service_serves_on(tmp_path: Path) -> None:
    """With max_message_bytes = 64 KiB (8 MiB by default): a request over it
    is RESOURCE_EXHAUSTED, an upload stream with a chunk over it too, and
    that upload stays resumable with the bytes that came before; a response
    over it (a page of 60 images with long descriptions) is refused the same
    way while a smaller page goes through."""
    limit = 64 * 1024
    settings = make_settings(tmp_path, max_message_bytes=limit, private_image_quota=100)
    async with serving(settings) as served:
        md = served.md("big-messages")
        images = served.images

        outcome = await call_rpc(
            served.channel,
            method_by_id("ImageService.CreateImage"),
            image_pb2.CreateImageRequest(image=private_image(description="d" * (limit + 1))),
            md,
        )
        assert outcome.code == Code.RESOURCE_EXHAUSTED, outcome

        queued = await create_private(images, md)
        first, rest = random_payload(1000), random_payload(3000)
        requests = [
            *upload_requests(queued.name, first),
            image_pb2.UploadImageDataRequest(chunk=b"\2" * (limit + 1)),
        ]
        outcome = await call_rpc(
            served.channel, method_by_id("ImageService.UploadImageData"), requests, md
        )
        assert outcome.code == Code.RESOURCE_EXHAUSTED, outcome

        async def resumable() -> bool:
            image = await images.GetImage(
                image_pb2.GetImageRequest(name=queued.name), metadata=md, timeout=CALL_TIMEOUT
            )
            return bool(image.status == image_pb2.IMAGE_STATUS_QUEUED)

        await eventually(resumable, "the broken-off upload is QUEUED again")
        image = await images.GetImage(
            image_pb2.GetImageRequest(name=queued.name), metadata=md, timeout=CALL_TIMEOUT
        )
        assert image.uploaded_bytes == len(first)
        active = await upload(images, md, queued.name, rest, offset=image.uploaded_bytes)
        assert active.status == image_pb2.IMAGE_STATUS_ACTIVE
        assert active.sha256 == hashlib.sha256(first + rest).hexdigest()

        for index in range(60):
            await create_private(images, md, display_name=f"long-{index}", description="z" * 1000)
        list_images = method_by_id("ImageService.ListImages")
        big_page = await call_rpc(
            served.channel, list_images, image_pb2.ListImagesRequest(page_size=1000), md
        )
        assert big_page.code == Code.RESOURCE_EXHAUSTED, big_page
        small_page = await call_rpc(
            served.channel, list_images, image_pb2.ListImagesRequest(page_size=10), md
        )
        assert small_page.code == Code.OK, small_page

        await still_serving(served.channel, md)


# -- the bugs found, one deterministic repro each -------------------------------------------------


async def test_nul_in_a_member_name_is_a_client_error(
    channel: grpc.aio.Channel, targets: Targets
) -> None:
    """`images/{own image}/members/a\\0b`: no such member (or an invalid
    name), on both databases."""
    name = member_name(targets.active, "a\x00b")
    problems: list[str] = []
    for rpc, message in (
        ("SharingService.GetImageMember", sharing_pb2.GetImageMemberRequest(name=name)),
        ("SharingService.DeleteImageMember", sharing_pb2.DeleteImageMemberRequest(name=name)),
    ):
        outcome = await call_rpc(channel, method_by_id(rpc), message, targets.md["owner"])
        if outcome.code not in (Code.INVALID_ARGUMENT, Code.NOT_FOUND):
            problems.append(f"{rpc}: {outcome.code.name} {outcome.details}")
    assert not problems, "\n".join(problems)


async def test_deeply_nested_cloud_config_is_invalid_argument(
    channel: grpc.aio.Channel, targets: Targets
) -> None:
    provisioning = ProvisioningStub(channel)
    md = targets.md["owner"]
    nested = "#cloud-config\n" + "[" * 2000
    await stop_server(provisioning, md, targets.server)
    problems: list[str] = []
    for rpc, message in (
        ("ProvisioningService.CreateServers", deploy_request(image=CENTOS, prefix="deep")),
        (
            "ProvisioningService.ReinstallServer",
            provisioning_pb2.ReinstallServerRequest(name=targets.server),
        ),
    ):
        message.user_data = nested
        outcome = await call_rpc(channel, method_by_id(rpc), message, md, max_messages=1)
        if outcome.code != Code.INVALID_ARGUMENT:
            problems.append(f"{rpc}: {outcome.code.name} {outcome.details}")
    assert not problems, "\n".join(problems)


LONG = "x" * 20_000
#: Requests whose error message repeats a long request value in full.
ECHOES: dict[str, tuple[str, Callable[[Targets], Message], str]] = {
    "GetFlavor unknown long name": (
        "ProvisioningService.GetFlavor",
        lambda t: provisioning_pb2.GetFlavorRequest(name="flavors/" + LONG),
        "owner",
    ),
    "CreateServers unknown long flavor": (
        "ProvisioningService.CreateServers",
        lambda t: deploy_request(flavor="flavors/" + LONG),
        "owner",
    ),
    "CreateImage long hardware_model": (
        "ImageService.CreateImage",
        lambda t: image_pb2.CreateImageRequest(image=private_image(hardware_model=LONG)),
        "owner",
    ),
    "CreateImage long os_distro": (
        "ImageService.CreateImage",
        lambda t: image_pb2.CreateImageRequest(image=private_image(os_distro=LONG)),
        "owner",
    ),
    "CreateImage public, long flavor": (
        "ImageService.CreateImage",
        lambda t: image_pb2.CreateImageRequest(image=public_image(supported_flavors=[LONG])),
        "admin",
    ),
    "UpdateImage long update_mask path": (
        "ImageService.UpdateImage",
        lambda t: image_pb2.UpdateImageRequest(
            image=image_pb2.Image(name=t.queued), update_mask=field_mask_pb2.FieldMask(paths=[LONG])
        ),
        "owner",
    ),
    "DeleteImage long etag": (
        "ImageService.DeleteImage",
        lambda t: image_pb2.DeleteImageRequest(name=t.queued, etag=LONG),
        "owner",
    ),
    "GetImageMember long project": (
        "SharingService.GetImageMember",
        lambda t: sharing_pb2.GetImageMemberRequest(name=member_name(t.active, LONG)),
        "owner",
    ),
}


async def test_long_values_are_not_echoed_in_full(
    channel: grpc.aio.Channel, targets: Targets
) -> None:
    """Each case gets its real code with a decodable rich status."""
    problems: list[str] = []
    for case, (rpc, build, caller) in ECHOES.items():
        outcome = await call_rpc(
            channel, method_by_id(rpc), build(targets), targets.md[caller], max_messages=1
        )
        if outcome.error is None:
            problems.append(f"{case}: succeeded")
            continue
        try:
            decode(outcome.error)
        except (AssertionError, ValueError) as broken:
            problems.append(f"{case}: {outcome.code.name} {broken}")
    assert not problems, "\n".join(problems)
