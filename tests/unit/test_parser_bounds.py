"""Every parser of a caller's input is bounded: user data (YAML), filters,
page tokens, SSH keys and the format inspector's reading of image headers.
Properties (hypothesis) check that hostile input only ever ends in the
parser's own client error, never another exception, and that the memory a
parse allocates stays small whatever the input claims (tracemalloc);
examples pin each bound."""

from __future__ import annotations

import base64
import struct
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bms_image.common.errors import DomainError, FailedPrecondition, InvalidArgument
from bms_image.common.paging import MAX_PAGE_TOKEN_LENGTH, PageTokens
from bms_image.fleet.adapters import firstboot
from bms_image.fleet.adapters.firstboot import (
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    cloud_config_files,
    parse_cloud_config,
)
from bms_image.fleet.domain.servers import (
    MAX_SSH_PUBLIC_KEY_BYTES,
    first_boot_violations,
    ssh_key_fingerprint,
)
from bms_image.images.adapters.formats import _inspect
from bms_image.images.domain.query import MAX_FILTER_CONDITIONS, parse_filter
from support.parser_bombs import alias_bomb

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

#: What one parse may allocate at its peak: far above any honest input's
#: needs, far below what a bomb's expansion would take.
PEAK_BYTES = 16 * 1024 * 1024


def peak_of(parse: Callable[[], object]) -> int:
    """The peak of what `parse` allocated (Python objects), whatever it raised."""
    tracemalloc.start()
    try:
        parse()
    except DomainError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


# -- user data ---------------------------------------------------------------------------------


def nested_blocks(depth: int) -> str:
    return "#cloud-config\n" + "".join(" " * level + f"k{level}:\n" for level in range(depth))


def many_nodes(count: int) -> str:
    return "#cloud-config\npadding: [" + ",".join(["1"] * count) + "]\n"


def refused_user_data(user_data: str, says: str = "") -> InvalidArgument:
    """cloud_config_files refuses `user_data` INVALID_USER_DATA, with a short
    message that says `says`."""
    with pytest.raises(InvalidArgument) as caught:
        cloud_config_files(user_data)
    error = caught.value
    assert error.reason == "INVALID_USER_DATA"
    assert error.violations and error.violations[0].field.startswith("user_data")
    assert len(error.message) < 400
    assert says in error.message, error.message
    return error


@pytest.mark.parametrize(
    ("user_data", "says"),
    [
        (alias_bomb(), "anchors or aliases"),
        ("#cloud-config\na: &x 1\n", "anchors or aliases"),
        ("#cloud-config\na: &x 1\nb: *x\n", "anchors or aliases"),
        ("#cloud-config\nwrite_files: *undefined\n", "anchors or aliases"),
        (nested_blocks(MAX_YAML_DEPTH + 2), f"deeper than {MAX_YAML_DEPTH}"),
        ("#cloud-config\n" + "[" * 200 + "]" * 200, "nested"),
        ("#cloud-config\n" + "{a: " * 200 + "1" + "}" * 200, "nested"),
        ("#cloud-config\n" + "- " * 200 + "x\n", "nested"),
        (many_nodes(MAX_YAML_NODES + 1), f"more than {MAX_YAML_NODES}"),
        ("#cloud-config\na: " + "1" * 5000 + "\n", "cannot be read"),
        ("#cloud-config\na: 2001-13-45\n", "cannot be read"),
        ("#cloud-config\n!!int \n", "cannot be read"),
        ("#cloud-config\na: !!binary zz\n", "not valid YAML"),
        ("#cloud-config\n!!python/object/apply:os.system ['true']\n", "not valid YAML"),
        ("#cloud-config\n---\na: 1\n---\nb: 2\n", "not valid YAML"),
    ],
)
def test_hostile_cloud_config_is_invalid_user_data(user_data: str, says: str) -> None:
    refused_user_data(user_data, says)


def test_the_alias_bomb_is_refused_before_it_expands() -> None:
    """9 ** 9 strings if expanded: refused with a tiny peak instead."""
    assert peak_of(lambda: cloud_config_files(alias_bomb())) < 1024 * 1024


def test_documents_within_the_bounds_are_read() -> None:
    within = nested_blocks(MAX_YAML_DEPTH - 2)
    assert cloud_config_files(within) == {}
    padded = many_nodes(MAX_YAML_NODES - 100) + "write_files:\n- path: /etc/motd\n  content: hi\n"
    assert cloud_config_files(padded) == {"etc/motd": b"hi"}
    merged = (
        "#cloud-config\nwrite_files:\n- {path: /a, content: 1}\n- path: /b\n  content: |\n    x\n"
    )
    assert cloud_config_files(merged) == {"a": b"1", "b": b"x\n"}


async def test_user_data_is_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """parse_cloud_config hands the parse to the user-data threads."""
    threads: list[str] = []

    def recording(user_data: str) -> dict[str, bytes]:
        threads.append(threading.current_thread().name)
        return cloud_config_files(user_data)

    monkeypatch.setattr(firstboot, "cloud_config_files", recording)
    files = await parse_cloud_config("#cloud-config\nwrite_files:\n- path: /x\n  content: y\n")
    assert files == {"x": b"y"}
    assert len(threads) == 1 and threads[0].startswith("user-data"), threads
    assert threads[0] != threading.current_thread().name
    assert await parse_cloud_config("#!/bin/sh\necho hi\n") == {}
    with pytest.raises(InvalidArgument):
        await parse_cloud_config(alias_bomb())


YAML_PIECES = st.sampled_from(
    [
        "#cloud-config\n", "write_files:\n", "- ", "path: ", "/etc/x", "content: ", "&a ", "*a",
        "&b ", "*b", "[", "]", "{", "}", ", ", ": ", "\n", "  ", "? ", "|\n", ">-\n", "'", '"',
        "!!binary ", "!!int ", "!!timestamp ", "!!python/name:os.system ", "<<: ", "---\n",
        "...\n", "%YAML 1.1\n", "%TAG ! tag:x:\n", "#", "\t", "0x", "1e999", "2001-12-14",
        "99:99:99", "~", "null", "yes", "\\", "\x85", "\ufeff", "é", "1" * 50,
    ]
)  # fmt: skip
YAMLISH = st.one_of(
    st.lists(YAML_PIECES, max_size=80).map(lambda parts: "#cloud-config\n" + "".join(parts)),
    st.text(max_size=300).map(lambda text: "#cloud-config\n" + text),
    st.builds(
        lambda depth, opener: "#cloud-config\n" + opener * depth,
        st.integers(1, 3000),
        st.sampled_from(["[", "{a: ", "- ", "? ", "&x [", "*x, "]),
    ),
)


@PROPERTY
@given(YAMLISH)
def test_any_yamlish_user_data_is_read_or_refused(user_data: str) -> None:
    try:
        files = cloud_config_files(user_data)
    except InvalidArgument as error:
        assert error.reason == "INVALID_USER_DATA"
        return
    assert all(isinstance(content, bytes) for content in files.values())


@PROPERTY
@given(YAMLISH)
def test_parsing_user_data_allocates_little(user_data: str) -> None:
    assert peak_of(lambda: cloud_config_files(user_data)) < PEAK_BYTES


# -- filters -------------------------------------------------------------------------------------


def test_a_filter_has_at_most_its_conditions() -> None:
    condition = "os_distro = centos"
    assert len(parse_filter(" AND ".join([condition] * MAX_FILTER_CONDITIONS))) == 32
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(" AND ".join([condition] * (MAX_FILTER_CONDITIONS + 1)))
    assert caught.value.reason == "INVALID_FILTER"
    assert f"more than {MAX_FILTER_CONDITIONS} conditions" in caught.value.message


FILTER_PIECES = st.sampled_from(
    ['"', '\\"', "\\", "=", "!=", "!", " ", "AND", "type", "name", "x*", "(", ")", "\x00", "é"]
)


@PROPERTY
@given(
    st.one_of(
        st.lists(FILTER_PIECES, max_size=400).map("".join),
        st.builds(lambda n, unit: unit * n, st.integers(1, 1100), FILTER_PIECES),
        st.text(max_size=1100),
    )
)
def test_any_filter_is_read_or_refused_with_little_memory(text: str) -> None:
    def parse() -> None:
        try:
            parse_filter(text)
        except InvalidArgument as error:
            assert error.reason == "INVALID_FILTER"
            raise

    assert peak_of(parse) < PEAK_BYTES


# -- page tokens ---------------------------------------------------------------------------------

TOKENS = PageTokens(b"k" * 32)


def test_a_long_page_token_is_refused_before_it_is_decoded() -> None:
    """Even one this service signed: no honest token is that long."""
    signed = TOKENS.encode_text("p" * MAX_PAGE_TOKEN_LENGTH, "scope")
    assert len(signed) > MAX_PAGE_TOKEN_LENGTH
    with pytest.raises(InvalidArgument) as caught:
        TOKENS.decode_text(signed, "scope")
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    honest = TOKENS.encode_text("p" * 64, "scope")
    assert TOKENS.decode_text(honest, "scope") == "p" * 64
    assert len(TOKENS.encode(2**63, "scope")) < MAX_PAGE_TOKEN_LENGTH


@PROPERTY
@given(
    st.one_of(
        st.text(max_size=600),
        st.binary(max_size=400).map(lambda raw: base64.urlsafe_b64encode(raw).decode()),
        st.builds(lambda n: "A" * n, st.integers(0, 100_000)),
    )
)
def test_any_page_token_is_refused_or_a_position(token: str) -> None:
    for decode in (TOKENS.decode, TOKENS.decode_text):
        try:
            decode(token, "scope")
        except InvalidArgument as error:
            assert error.reason == "INVALID_PAGE_TOKEN"


# -- SSH keys --------------------------------------------------------------------------------------

REAL_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def test_an_ssh_key_line_has_at_most_16_kib() -> None:
    assert first_boot_violations(REAL_KEY + " me", "") == []
    long_comment = REAL_KEY + " " + "c" * MAX_SSH_PUBLIC_KEY_BYTES
    (violation,) = first_boot_violations(long_comment, "")
    assert violation.field == "ssh_public_key"
    assert "at most 16384" in violation.description
    huge = "ssh-rsa " + "A" * (4 * 1024 * 1024)
    assert [v.field for v in first_boot_violations(huge, "")] == ["ssh_public_key"]
    assert ssh_key_fingerprint(huge) == ""


@PROPERTY
@given(
    st.one_of(
        st.text(max_size=200),
        st.builds(
            lambda kind, body, comment: f"{kind} {body}{comment}",
            st.sampled_from(["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "x"]),
            st.one_of(
                st.text("ABCDEFabcdef0123456789+/=", max_size=400),
                st.binary(max_size=300).map(lambda raw: base64.b64encode(raw).decode()),
            ),
            st.sampled_from(["", " me", " " + "c" * 20_000, "\nsecond line", "\x00"]),
        ),
    )
)
def test_any_ssh_key_is_judged_without_raising(key: str) -> None:
    violations = first_boot_violations(key, "")
    fingerprint = ssh_key_fingerprint(key)
    if not violations and key:
        assert fingerprint.startswith("SHA256:")


# -- image headers (oslo.utils format_inspector) -----------------------------------------------


@pytest.fixture(scope="module")
def header_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("headers")


def qcow2_header(size: int, l1_size: int, cluster_bits: int, backing_offset: int = 0) -> bytes:
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQII",
        b"QFI\xfb", 3, backing_offset, 0, cluster_bits, size, 0, l1_size, 0x30000, 0x10000,
        1, 1, 0, 0, 0, 4, 112,
    )  # fmt: skip
    return header.ljust(512, b"\0")


def vmdk_sparse_header(capacity: int, desc_offset: int, desc_size: int) -> bytes:
    """A VMDK sparse extent header (KDMV) naming a descriptor region."""
    header = struct.pack(
        "<4sIIQQQQIQQQBccccH",
        b"KDMV", 1, 3, capacity, 128, desc_offset, desc_size, 512, 0, 0, 0, 0,
        b"\n", b" ", b"\r", b"\n", 0,
    )  # fmt: skip
    return header.ljust(512, b"\0")


def vhdx_file(region_count: int, entries: bytes) -> bytes:
    ident = b"vhdxfile".ljust(64 * 1024, b"\0")
    headers = bytes(128 * 1024)
    region = (b"regi" + struct.pack("<II", 0, region_count) + entries).ljust(64 * 1024, b"\0")
    return ident + headers + region + bytes(64 * 1024)


HEADERS = st.one_of(
    st.builds(
        qcow2_header,
        st.sampled_from([0, 1, 2**40, 2**63 - 1, 2**64 - 1]),
        st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1]),
        st.sampled_from([0, 9, 16, 21, 31, 63]),
        st.sampled_from([0, 512, 2**63]),
    ),
    st.builds(
        vmdk_sparse_header,
        st.sampled_from([0, 2**40, 2**63 - 1]),
        st.sampled_from([0, 1, 2**40, 2**63 - 1]),
        st.sampled_from([0, 1, 2**20, 2**40, 2**63 - 1]),
    ),
    st.builds(
        lambda text: b"# Disk DescriptorFile\n" + text.encode() * 1,
        st.sampled_from(
            [
                'createType=monolithicSparse\nRW 2147483647 SPARSE "x.vmdk"\n',
                "createType=vmfs\n" + 'RW 1 FLAT "/etc/passwd" 0\n' * 5000,
                'createType="monolithicFlat"\nRW 99999999999999999999 FLAT "a" 0\n',
            ]
        ),
    ),
    st.builds(
        vhdx_file,
        st.sampled_from([0, 1, 2047, 2048, 2**32 - 1]),
        st.binary(max_size=64).map(lambda raw: raw * 16),
    ),
    st.binary(max_size=4096),
)


@settings(PROPERTY, max_examples=60)
@given(header=HEADERS, tail=st.binary(max_size=2048))
def test_hostile_image_headers_are_judged_with_little_memory(
    header_dir: Path, header: bytes, tail: bytes
) -> None:
    """Whatever sizes a header claims, inspection allocates a bounded amount
    and ends in a Inspection or a FailedPrecondition, never another error."""
    path = header_dir / "hostile.img"
    path.write_bytes(header + tail)

    def inspect() -> None:
        try:
            _inspect(path, "images/hostile")
        except FailedPrecondition as error:
            assert error.reason.startswith("IMAGE_")
            raise

    assert peak_of(inspect) < PEAK_BYTES


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (qcow2_header(2**63 - 1, 2**32 - 1, 16), "qcow2"),
        (qcow2_header(2**40, 1, 16, backing_offset=512), "IMAGE_UNSAFE"),
        # A VMDK header whose descriptor never comes: the inspector cannot
        # check it (oslo.utils raises ImageFormatError from safety_check).
        (vmdk_sparse_header(2**40, 1, 2**40), "IMAGE_UNSAFE"),
        (vmdk_sparse_header(2**63 - 1, 2**63 - 1, 2**63 - 1), "IMAGE_UNSAFE"),
        (vhdx_file(2**32 - 1, b"\xff" * 1024), "vhdx"),
        # A bare descriptor naming host files is no disk the inspector knows:
        # raw bytes, which are never opened as a VMDK.
        (b"# Disk DescriptorFile\n" + b'RW 1 FLAT "/etc/passwd" 0\n' * 40_000, "raw"),
    ],
    ids=["qcow2 of 8 EiB", "qcow2 backing file", "vmdk without descriptor",
         "vmdk claiming everything", "vhdx of 4 G regions", "bare vmdk descriptor of 1 MiB"],
)  # fmt: skip
def test_hostile_headers(header_dir: Path, content: bytes, expected: str) -> None:
    path = header_dir / "one.img"
    path.write_bytes(content + bytes(4096))
    outcome = ""

    def inspect() -> None:
        nonlocal outcome
        try:
            outcome = _inspect(path, "images/hostile").format.value
        except FailedPrecondition as error:
            outcome = error.reason
            raise

    assert peak_of(inspect) < PEAK_BYTES
    assert outcome.startswith(expected), outcome
