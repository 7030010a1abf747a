"""What Cloud-Init does at a server's first boot, and the plug-in check on a
disk's content (never on flags): each plug-in file must be there, byte for
byte the known-good release it claims to be."""

from __future__ import annotations

import asyncio
import concurrent.futures
import posixpath
from collections.abc import Callable
from typing import Any, Protocol

import yaml

from bms_image.common.disk_format import PLUGIN_PATHS, Disk, plugin_content, read_file
from bms_image.common.errors import FieldViolation, InvalidArgument
from bms_image.common.model import Plugin, PluginKind
from bms_image.fleet.domain.servers import intact_plugins

__all__ = [
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "CloudInitFiles",
    "cloud_config_files",
    "first_boot_files",
    "intact_plugins",
    "parse_cloud_config",
    "plugin_states",
]

#: Bounds of a `#cloud-config` document, checked while it is composed, so a
#: hostile one costs at most this much work whatever it claims. The size of
#: user data itself is bounded before parsing (domain.servers.MAX_USER_DATA_BYTES).
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 64

#: User data is parsed here, never on the event loop nor in the shared default
#: executor, so hostile documents queue behind each other, not in front of
#: the database or file work of other callers. One thread: a parse is CPU
#: work under the GIL, and one parser competing with the event loop costs
#: other callers less than several (bench.bystander measures it).
_PARSER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="user-data")


class _Refused(Exception):
    """The document exceeds a bound; the message says which."""


class _Bounds(yaml.composer.Composer):
    """PyYAML's SafeLoader without anchors and aliases (the "billion laughs":
    a kilobyte of nested aliases expands to gigabytes) and with a bound on the
    nodes and the nesting depth. Composition is where nodes are made, so the
    bounds hold before any object is constructed."""

    _nodes = 0
    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[attr-defined]  # the parser's, in the MRO
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused("uses YAML anchors or aliases (& and *), which user data may not use")
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise _Refused(f"has more than {MAX_YAML_NODES} YAML nodes")
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _Refused(f"is nested deeper than {MAX_YAML_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _PureLoader(_Bounds, yaml.SafeLoader):
    """The bounds over PyYAML's pure-Python parser."""


#: The bounds over libyaml's parser when PyYAML was built with it: about ten
#: times faster, iterative and linear in the (bounded) input. Its events go
#: through PyYAML's own composer (the base of _Bounds, so it comes first in the
#: MRO), so that compose_node, which checks the bounds, is Python's, not libyaml's.
class _Loader(Protocol):
    def get_single_data(self) -> Any: ...
    def dispose(self) -> None: ...


_LOADER: Callable[[str], _Loader] = _PureLoader
if yaml.__with_libyaml__:
    import yaml._yaml

    class _CLoader(
        _Bounds,
        yaml._yaml.CParser,
        yaml.constructor.SafeConstructor,
        yaml.resolver.Resolver,
    ):
        def __init__(self, stream: str) -> None:
            yaml._yaml.CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    _LOADER = _CLoader


def _invalid_yaml(problem: str) -> InvalidArgument:
    return InvalidArgument(
        "INVALID_USER_DATA",
        f"user_data: #cloud-config {problem[:300]}",
        [FieldViolation("user_data", problem[:300])],
    )


def _load_bounded(text: str) -> object:
    loader = _LOADER(text)
    try:
        return loader.get_single_data()
    except _Refused as error:
        raise _invalid_yaml(str(error)) from None
    except yaml.YAMLError as error:
        raise _invalid_yaml(f"is not valid YAML: {error}") from None
    except Exception as error:
        # A value PyYAML's constructor cannot build, and which it does not
        # report as a YAMLError: an int of more than 4,300 digits or a date
        # like 2001-13-45 (ValueError), an empty `!!int` (IndexError), ...
        # The loader only reads the text, so its failure is the document's.
        raise _invalid_yaml(f"has a value that cannot be read: {error!s:.200}") from None
    finally:
        loader.dispose()


def cloud_config_files(user_data: str) -> dict[str, bytes]:
    """The `write_files` of `#cloud-config` user data; other user data (a
    script, say) is only stored. Raises InvalidArgument (INVALID_USER_DATA)
    for bad or hostile YAML. Blocking: call parse_cloud_config on the loop."""
    if not user_data.startswith("#cloud-config"):
        return {}
    config = _load_bounded(user_data)
    entries = (config or {}).get("write_files", []) if isinstance(config, dict) else []
    files: dict[str, bytes] = {}
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        path = entry.get("path") if isinstance(entry, dict) else None
        content = entry.get("content", "") if isinstance(entry, dict) else None
        normal = posixpath.normpath(path) if isinstance(path, str) else ""
        if (
            not isinstance(path, str)
            or not path.startswith("/")
            or path.endswith("/")
            or ".." in path.split("/")
            or normal in ("/", "//")
        ):
            raise InvalidArgument(
                "INVALID_USER_DATA",
                f"user_data: write_files[{index}] needs an absolute `path` naming a file",
                [FieldViolation(f"user_data.write_files[{index}].path", "must name a file")],
            )
        files[normal.lstrip("/")] = str(content).encode()
    return files


async def parse_cloud_config(user_data: str) -> dict[str, bytes]:
    """cloud_config_files off the event loop, in the user-data parser's threads."""
    if not user_data.startswith("#cloud-config"):
        return {}
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_PARSER, cloud_config_files, user_data)


def first_boot_files(
    host_name: str, ssh_public_key: str, user_data: str, user_files: dict[str, bytes]
) -> dict[str, bytes]:
    """What Cloud-Init writes at first boot; `user_files` are the write_files
    of the user data, parsed once when the deployment was checked."""
    files = {"etc/hostname": f"{host_name}\n".encode()}
    if ssh_public_key:
        files["root/.ssh/authorized_keys"] = ssh_public_key.strip().encode() + b"\n"
    if user_data:
        files["var/lib/cloud/instance/user-data.txt"] = user_data.encode()
        files.update(user_files)
    return files


def plugin_states(disk: Disk) -> dict[PluginKind, tuple[str, str]]:
    """For each plug-in: ("intact" | "modified" | "missing", version). Blocking."""
    states: dict[PluginKind, tuple[str, str]] = {}
    for kind, path in PLUGIN_PATHS.items():
        content = read_file(disk, path)
        if content is None:
            states[kind] = ("missing", "")
            continue
        first_line = content.split(b"\n", 1)[0].decode(errors="replace").split()
        version = first_line[2] if len(first_line) == 3 and first_line[1] == kind.value else ""
        intact = bool(version) and content == plugin_content(Plugin(kind, version))
        states[kind] = ("intact" if intact else "modified", version)
    return states


class CloudInitFiles:
    """The fleet's CloudInit port: user data parsed in the bounded parser's
    thread, and the files Cloud-Init writes at first boot."""

    async def parse_user_data(self, user_data: str) -> dict[str, bytes]:
        return await parse_cloud_config(user_data)

    def first_boot_files(
        self, host_name: str, ssh_public_key: str, user_data: str, user_files: dict[str, bytes]
    ) -> dict[str, bytes]:
        return first_boot_files(host_name, ssh_public_key, user_data, user_files)
