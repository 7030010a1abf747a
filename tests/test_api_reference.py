"""docs/api.md is generated (scripts/api_reference.py, `make docs`) from the
protos' comments and the error reasons raised in src/bms_image. It is
committed so people can read it without running anything, so it must never
drift from its sources: these tests regenerate it and compare."""

from __future__ import annotations

import difflib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FileDescriptor

from bms.image.v1 import image_pb2, provisioning_pb2, sharing_pb2

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "scripts" / "api_reference.py"
COMMITTED = ROOT / "docs" / "api.md"
FILES: list[FileDescriptor] = [
    image_pb2.DESCRIPTOR,
    sharing_pb2.DESCRIPTOR,
    provisioning_pb2.DESCRIPTOR,
]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> str:
    output = tmp_path_factory.mktemp("docs") / "api.md"
    done = subprocess.run(
        [sys.executable, str(GENERATOR), "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{GENERATOR.name} failed:\n{done.stdout}{done.stderr}"
    return output.read_text()


def test_the_committed_reference_is_up_to_date(generated: str) -> None:
    committed = COMMITTED.read_text() if COMMITTED.exists() else ""

    if committed != generated:
        diff = difflib.unified_diff(
            committed.splitlines(),
            generated.splitlines(),
            "docs/api.md (committed)",
            "docs/api.md (generated)",
            lineterm="",
        )
        shown = "\n".join(list(diff)[:80])
        pytest.fail(
            "docs/api.md is out of date with protos/ or the error reasons in src/bms_image: "
            f"run `make docs` and commit docs/api.md\n{shown}",
            pytrace=False,
        )


def test_every_service_method_message_field_and_enum_value_is_documented(
    generated: str,
) -> None:
    for file in FILES:
        for service in file.services_by_name.values():
            assert f"\n### {service.name}\n" in generated
            for method in service.methods:
                assert f"\n#### {service.name}.{method.name}\n" in generated
        for message in file.message_types_by_name.values():
            assert f"\n### {message.name}\n" in generated
            section = generated.split(f"\n### {message.name}\n", 1)[1].split("\n### ", 1)[0]
            for field in message.fields:
                assert f"| `{field.name}` | {field.number} |" in section, (
                    f"{message.name}.{field.name}"
                )
        for enum in file.enum_types_by_name.values():
            section = generated.split(f"\n### {enum.name}\n", 1)[1].split("\n### ", 1)[0]
            for value in enum.values:
                assert f"| `{value.name}` | {value.number} |" in section


def test_streaming_methods_are_marked(generated: str) -> None:
    assert (
        "`rpc UploadImageData(stream UploadImageDataRequest) returns (Image)` — client streaming"
    ) in generated
    assert (
        "`rpc CreateServers(CreateServersRequest) returns (stream ServerEvent)` — server streaming"
    ) in generated
    assert "`rpc GetImage(GetImageRequest) returns (Image)` — unary" in generated


def test_comments_come_from_the_protos(generated: str) -> None:
    assert "ImageService manages the catalog of bare-metal server images" in generated
    assert "| `etag` | 25 | `string` | Opaque version tag, changed by every update." in generated
    # Indented diagrams in comments become code blocks.
    assert "```text\nQUEUED  -> SAVING       data upload starts\n" in generated


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("IMAGE_NOT_FOUND", "NOT_FOUND"),
        ("IMAGE_QUOTA_EXCEEDED", "RESOURCE_EXHAUSTED"),
        ("IMAGE_PROTECTED", "FAILED_PRECONDITION"),
        ("ETAG_MISMATCH", "ABORTED"),
        ("INVALID_FILTER", "INVALID_ARGUMENT"),
        ("INVALID_PAGE_TOKEN", "INVALID_ARGUMENT"),
        ("INVALID_FIELD", "INVALID_ARGUMENT"),
        ("SHARED_IMAGE_NOT_ACCEPTED", "FAILED_PRECONDITION"),
        ("IMAGE_CHECKSUM_MISMATCH", "DATA_LOSS"),
        ("IMAGE_UNSAFE", "FAILED_PRECONDITION"),
        ("IMAGE_FORMAT_UNKNOWN", "FAILED_PRECONDITION"),
        ("TOKEN_EXPIRED", "UNAUTHENTICATED"),
        ("TOKEN_MISSING", "UNAUTHENTICATED"),
        ("ONLY_MEMBER_ANSWERS", "PERMISSION_DENIED"),
    ],
)
def test_error_reasons_are_listed_with_their_status_code(
    generated: str, reason: str, code: str
) -> None:
    reasons = generated.split("\n## Error reasons\n", 1)[1]

    assert f"| `{reason}` | {code} |" in reasons


def test_internal_links_point_at_headings(generated: str) -> None:
    headings = re.findall(r"^#+ (.+)$", generated, flags=re.MULTILINE)
    anchors = {re.sub(r"[^a-z0-9_ -]", "", h.lower()).replace(" ", "-") for h in headings}
    links = set(re.findall(r"\]\(#([^)]+)\)", generated))

    assert links
    assert links <= anchors, sorted(links - anchors)
