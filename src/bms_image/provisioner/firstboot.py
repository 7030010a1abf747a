"""What Cloud-Init does at a server's first boot, and the plug-in check on a
disk's content (never on flags): each plug-in file must be there, byte for
byte the known-good release it claims to be."""

from __future__ import annotations

import posixpath

import yaml

from ..disks import PLUGIN_PATHS, Disk, plugin_content, read_file
from ..domain.errors import FieldViolation, InvalidArgument
from ..domain.model import Plugin, PluginKind


def cloud_config_files(user_data: str) -> dict[str, bytes]:
    """The `write_files` of `#cloud-config` user data; other user data (a
    script, say) is only stored. Raises InvalidArgument for bad YAML."""
    if not user_data.startswith("#cloud-config"):
        return {}
    try:
        config = yaml.safe_load(user_data)
    except (yaml.YAMLError, RecursionError) as error:  # RecursionError: nested too deep
        problem = "is nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise InvalidArgument(
            "INVALID_USER_DATA",
            f"user_data: #cloud-config is not valid YAML: {problem[:300]}",
            [FieldViolation("user_data", "is not valid YAML")],
        ) from None
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


def first_boot_files(host_name: str, ssh_public_key: str, user_data: str) -> dict[str, bytes]:
    files = {"etc/hostname": f"{host_name}\n".encode()}
    if ssh_public_key:
        files["root/.ssh/authorized_keys"] = ssh_public_key.strip().encode() + b"\n"
    if user_data:
        files["var/lib/cloud/instance/user-data.txt"] = user_data.encode()
        files.update(cloud_config_files(user_data))
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


def intact_plugins(states: dict[PluginKind, tuple[str, str]]) -> list[Plugin]:
    return [Plugin(kind, version) for kind, (state, version) in states.items() if state == "intact"]
