"""Printing results: Rich tables for people, or JSON for scripts with the
field names grpcurl prints (proto names, enum names, unset fields left out)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Annotated, Any

import typer
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

#: Width of tables written into a file or a pipe (a terminal's own width otherwise).
PIPE_WIDTH = 250

JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="print JSON for scripts (grpcurl's field names) instead of a table"
    ),
]


def to_json(message: Message, indent: int | None = 2) -> str:
    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, indent=indent, sort_keys=False
    )


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# -- values for people -----------------------------------------------------------


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def enum_label(enum: Any, number: int) -> str:
    """`IMAGE_STATUS_ACTIVE` -> `ACTIVE`: the value without its type's prefix.
    (`enum` is an EnumDescriptor, of the pure-Python or the upb flavour.)"""
    value = enum.values_by_number.get(number) if enum is not None else None
    if value is None:
        return str(number)
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    return str(value.name).removeprefix(prefix)


def label(message: Message, field_name: str) -> str:
    """The label of an enum field of a message."""
    descriptor = message.DESCRIPTOR.fields_by_name[field_name]
    return enum_label(descriptor.enum_type, getattr(message, field_name))


def timestamp(value: timestamp_pb2.Timestamp) -> str:
    if not value.seconds and not value.nanos:
        return ""
    return value.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def short_name(name: str) -> str:
    """`images/{id}` -> `{id}` (the commands accept either)."""
    return name.rsplit("/", 1)[-1]


def _scalar(field: FieldDescriptor, value: Any) -> str:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_label(field.enum_type, value)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if isinstance(value, timestamp_pb2.Timestamp):
            return timestamp(value)
        return " ".join(f"{f.name}={_scalar(f, v)}" for f, v in value.ListFields())
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "yes" if value else "no"
    if field.name.endswith("_bytes") and isinstance(value, int):
        return f"{human_bytes(value)} ({value})"
    return str(value)


def field_rows(message: Message) -> list[tuple[str, str]]:
    """(field, text) for each field that is set, in field-number order."""
    rows = []
    for field, value in message.ListFields():
        if field.is_repeated:
            text = ", ".join(_scalar(field, item) for item in value)
        else:
            text = _scalar(field, value)
        rows.append((field.name, text))
    return rows


# -- printing -------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Any], str]
    no_wrap: bool = False


class Output:
    """Where a command prints: results on stdout, progress and notes on stderr."""

    def __init__(self, json_output: bool = False) -> None:
        self.json = json_output
        self.out = Console(highlight=False)
        if not self.out.is_terminal and not os.environ.get("COLUMNS"):
            # Into a file or a pipe: one line per row (for grep), not 80 columns.
            self.out.width = PIPE_WIDTH
        self.err = Console(stderr=True, highlight=False)

    def write_json(self, message: Message, indent: int | None = 2) -> None:
        sys.stdout.write(to_json(message, indent) + "\n")
        sys.stdout.flush()

    def detail(self, message: Message) -> None:
        """One resource: JSON, or a two-column table of its set fields."""
        if self.json:
            self.write_json(message)
            return
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column("field", style="bold", no_wrap=True)
        table.add_column("value", overflow="fold")
        for name, text in field_rows(message):
            table.add_row(Text(name), Text(text))
        self.out.print(table)

    def listing(
        self, response: Message, items: Sequence[Message], columns: Sequence[Column]
    ) -> None:
        """A list: the response message (every page merged) as JSON, or a table."""
        if self.json:
            self.write_json(response)
            return
        table = Table(
            *(c.header for c in columns), header_style="bold", box=box.SIMPLE_HEAD, show_edge=False
        )
        for column, rich_column in zip(columns, table.columns, strict=True):
            rich_column.no_wrap = column.no_wrap
        for item in items:
            table.add_row(*(Text(column.value(item)) for column in columns))
        self.out.print(table)

    def done(self, text: str, message: Message) -> None:
        """The answer of a call that returns nothing to show (Empty)."""
        if self.json:
            self.write_json(message)
        else:
            self.out.print(Text(text))

    def note(self, text: str) -> None:
        self.err.print(Text(text))


def pages(fetch: Callable[[str], Any], items: Callable[[Any], Iterable[Message]]) -> list[Any]:
    """Every item of a paged listing: `fetch(page_token)` until the token is empty."""
    found: list[Any] = []
    token = ""
    while True:
        response = fetch(token)
        found.extend(items(response))
        token = response.next_page_token
        if not token:
            return found
