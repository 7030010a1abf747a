"""Generates docs/api.md, the reference of the bms.image.v1 API.

The protos are the source: they are compiled with grpc_tools.protoc
(`--include_source_info`), and every service, method, message, field and enum
value is documented with the leading comment it has in its .proto file (buf
lint's COMMENTS rules make sure there is one). The error reasons are read
from the code: every `DomainError` raised in src/bms_image with a literal
reason, its gRPC status code taken from the API layer's own mapping
(`bms_image.common.status.status_code_of`).

    python scripts/api_reference.py                 # writes docs/api.md
    python scripts/api_reference.py --output FILE   # elsewhere (- for stdout)

`make docs` runs it; tests/test_api_reference.py fails when the committed
docs/api.md is not what this script writes.
"""

from __future__ import annotations

import argparse
import ast
import importlib.resources
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc  # type: ignore[import-untyped]

from bms_image.common import errors
from bms_image.common.status import ERROR_DOMAIN, status_code_of

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
PACKAGE = "bms.image.v1"
PACKAGE_DIR = Path(*PACKAGE.split("."))
SOURCE = ROOT / "src" / "bms_image"
DEFAULT_OUTPUT = ROOT / "docs" / "api.md"

# Field numbers of descriptor.proto, the steps of a SourceCodeInfo path.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM, MESSAGE_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2

Path_ = tuple[int, ...]
FieldType = descriptor_pb2.FieldDescriptorProto.Type

# --------------------------------------------------------------------------
# The protos, compiled with their comments


def compile_protos(protos: Path = PROTOS) -> descriptor_pb2.FileDescriptorSet:
    """Our .proto files as descriptors with source info (comments), in the
    order of their paths; imports (the well-known types) are left out."""
    files = sorted(p.relative_to(protos).as_posix() for p in (protos / PACKAGE_DIR).glob("*.proto"))
    if not files:
        raise SystemExit(f"no .proto files in {protos / PACKAGE_DIR}")
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "descriptors.binpb"
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{protos}",
                f"-I{well_known}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *files,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed ({code}) on {', '.join(files)}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


class Comments:
    """The comments of one file, by SourceCodeInfo path."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._locations = {
            tuple(location.path): location for location in file.source_code_info.location
        }

    def __call__(self, path: Path_) -> str:
        location = self._locations.get(path)
        if location is None:
            return ""
        parts = [location.leading_comments, location.trailing_comments]
        return "\n\n".join(_uncomment(part) for part in parts if part.strip())


def _uncomment(text: str) -> str:
    """protoc keeps what follows `//`: drop the one space after it."""
    lines = [line.removeprefix(" ").rstrip() for line in text.rstrip().split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Markdown


def _escape_text(text: str, in_table: bool) -> str:
    """Escapes what Markdown would misread, outside `code spans`."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # unbalanced backticks: all text
        parts = [text.replace("`", "\\`")]
    out = []
    for index, part in enumerate(parts):
        if index % 2 == 0:
            part = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", part)  # would open an HTML tag
        if in_table:
            part = part.replace("|", "\\|")
        out.append(part)
    return "`".join(out)


def cell(text: str) -> str:
    """A comment as one table cell: one line, pipes escaped."""
    return _escape_text(" ".join(text.split()), in_table=True)


_LIST_ITEM = re.compile(r"(?:[-*]|\d+\.) ")


def block(text: str) -> str:
    """A comment as Markdown: paragraphs and `- ` lists as written (a list
    item's indented lines continue it; the line after a list starts a new
    paragraph), other indented lines (state diagrams) as a code block."""
    chunks: list[str] = []
    code: list[str] = []
    prose: list[str] = []
    in_list = False

    def flush_code() -> None:
        while code and not code[-1].strip():
            code.pop()
        if code:
            indent = min(len(line) - len(line.lstrip()) for line in code if line.strip())
            body = "\n".join(line[indent:] for line in code)
            chunks.append(f"```text\n{body}\n```")
            code.clear()

    def flush_prose() -> None:
        if prose:
            chunks.append("\n".join(_escape_text(line, in_table=False) for line in prose))
            prose.clear()

    for line in text.split("\n"):
        if not line.strip():
            if code:
                code.append("")
            else:
                flush_prose()
                in_list = False
        elif _LIST_ITEM.match(line):
            flush_code()
            prose.append(line)
            in_list = True
        elif line.startswith("  "):
            if in_list and not code:
                prose.append(line)
            else:
                flush_prose()
                code.append(line)
        else:
            flush_code()
            if in_list:
                flush_prose()
                in_list = False
            prose.append(line)
    flush_code()
    flush_prose()
    return "\n\n".join(chunks)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading made of a name like `ImageService.ListImages`."""
    return re.sub(r"[^a-z0-9_ -]", "", heading.lower()).replace(" ", "-")


# --------------------------------------------------------------------------
# The reference


_SCALARS = {
    FieldType.Value(name): name.removeprefix("TYPE_").lower()
    for name in FieldType.keys()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


@dataclass
class Api:
    files: list[descriptor_pb2.FileDescriptorProto]

    def __post_init__(self) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        for file in self.files:
            for name, message, _ in _messages(file):
                self.messages[f".{PACKAGE}.{name}"] = message

    def type_ref(self, type_name: str) -> str:
        """A message or enum type: linked when it is ours, else its full name."""
        prefix = f".{PACKAGE}."
        if type_name.startswith(prefix):
            local = type_name.removeprefix(prefix)
            return f"[`{local}`](#{anchor(local)})"
        return f"`{type_name.removeprefix('.')}`"

    def field_type(self, field: descriptor_pb2.FieldDescriptorProto) -> str:
        if field.type in (FieldType.TYPE_MESSAGE, FieldType.TYPE_ENUM):
            entry = self.messages.get(field.type_name)
            if entry is not None and entry.options.map_entry:
                key, value = entry.field[0], entry.field[1]
                return f"map<{self._plain_type(key)}, {self._plain_type(value)}>"
            shown = self.type_ref(field.type_name)
        else:
            shown = f"`{_SCALARS[field.type]}`"
        if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
            return f"repeated {shown}"
        if field.proto3_optional:
            return f"optional {shown}"
        return shown

    def _plain_type(self, field: descriptor_pb2.FieldDescriptorProto) -> str:
        if field.type in (FieldType.TYPE_MESSAGE, FieldType.TYPE_ENUM):
            return self.type_ref(field.type_name)
        return f"`{_SCALARS[field.type]}`"


def _messages(
    file: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto, Path_]]:
    """Every message of a file, nested ones after their parent: (dotted name
    within the package, descriptor, SourceCodeInfo path)."""

    def walk(
        message: descriptor_pb2.DescriptorProto, name: str, path: Path_
    ) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto, Path_]]:
        yield name, message, path
        for index, nested in enumerate(message.nested_type):
            yield from walk(nested, f"{name}.{nested.name}", (*path, MESSAGE_NESTED, index))

    for index, message in enumerate(file.message_type):
        yield from walk(message, message.name, (FILE_MESSAGE, index))


def _enums(
    file: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[str, descriptor_pb2.EnumDescriptorProto, Path_]]:
    for index, enum in enumerate(file.enum_type):
        yield enum.name, enum, (FILE_ENUM, index)
    for name, message, path in _messages(file):
        for index, enum in enumerate(message.enum_type):
            yield f"{name}.{enum.name}", enum, (*path, MESSAGE_ENUM, index)


def _short(type_name: str) -> str:
    """A type as the .proto file writes it: ours without the package."""
    return type_name.removeprefix(f".{PACKAGE}.").removeprefix(".")


def _streaming(method: descriptor_pb2.MethodDescriptorProto) -> str:
    return {
        (False, False): "unary",
        (True, False): "client streaming",
        (False, True): "server streaming",
        (True, True): "bidirectional streaming",
    }[(method.client_streaming, method.server_streaming)]


def render_services(api: Api) -> list[str]:
    out = ["## Services", ""]
    for file in api.files:
        comments = Comments(file)
        for s_index, service in enumerate(file.service):
            path: Path_ = (FILE_SERVICE, s_index)
            out += [f"### {service.name}", "", f"`{PACKAGE}.{service.name}`, in `{file.name}`.", ""]
            out += [block(comments(path)), ""]
            out += ["| Method | Request | Response | Kind |", "|---|---|---|---|"]
            for method in service.method:
                heading = f"{service.name}.{method.name}"
                request = ("stream " if method.client_streaming else "") + api.type_ref(
                    method.input_type
                )
                response = ("stream " if method.server_streaming else "") + api.type_ref(
                    method.output_type
                )
                out.append(
                    f"| [{method.name}](#{anchor(heading)}) | {request} | {response} "
                    f"| {_streaming(method)} |"
                )
            out.append("")
            for m_index, method in enumerate(service.method):
                heading = f"{service.name}.{method.name}"
                request = ("stream " if method.client_streaming else "") + _short(method.input_type)
                response = ("stream " if method.server_streaming else "") + _short(
                    method.output_type
                )
                signature = f"rpc {method.name}({request}) returns ({response})"
                out += [f"#### {heading}", "", f"`{signature}` — {_streaming(method)}", ""]
                out += [block(comments((*path, SERVICE_METHOD, m_index))), ""]
    return out


def render_messages(api: Api) -> list[str]:
    out = ["## Messages", ""]
    for file in api.files:
        comments = Comments(file)
        for name, message, path in _messages(file):
            if message.options.map_entry:
                continue
            out += [f"### {name}", "", f"`{PACKAGE}.{name}`, in `{file.name}`.", ""]
            out += [block(comments(path)), ""]
            if not message.field:
                out += ["No fields.", ""]
                continue
            out += ["| Field | Number | Type | Description |", "|---|---|---|---|"]
            for index, field in enumerate(message.field):
                shown = api.field_type(field)
                if field.HasField("oneof_index") and not field.proto3_optional:
                    group = message.oneof_decl[field.oneof_index].name
                    shown += f" (oneof `{group}`)"
                description = cell(comments((*path, MESSAGE_FIELD, index)))
                if field.options.deprecated:
                    description = f"**Deprecated.** {description}"
                out.append(f"| `{field.name}` | {field.number} | {shown} | {description} |")
            out.append("")
            for index, oneof in enumerate(message.oneof_decl):
                members = [
                    f for f in message.field if f.HasField("oneof_index") and f.oneof_index == index
                ]
                if any(f.proto3_optional for f in members):
                    continue  # the synthetic oneof of a proto3 `optional` field
                names = ", ".join(f"`{f.name}`" for f in members)
                text = cell(comments((*path, MESSAGE_ONEOF, index)))
                out += [f"Oneof `{oneof.name}` ({names}, at most one set): {text}", ""]
    return out


def render_enums(api: Api) -> list[str]:
    out = ["## Enums", ""]
    for file in api.files:
        comments = Comments(file)
        for name, enum, path in _enums(file):
            out += [f"### {name}", "", f"`{PACKAGE}.{name}`, in `{file.name}`.", ""]
            out += [block(comments(path)), ""]
            out += ["| Value | Number | Description |", "|---|---|---|"]
            for index, value in enumerate(enum.value):
                text = cell(comments((*path, ENUM_VALUE, index)))
                out.append(f"| `{value.name}` | {value.number} | {text} |")
            out.append("")
    return out


# --------------------------------------------------------------------------
# Error reasons, read from the code


@dataclass(frozen=True, order=True)
class Raised:
    """One place in src/bms_image that makes a domain error with a fixed reason."""

    reason: str
    code: str
    module: str
    line: int
    message: str


@dataclass(frozen=True)
class _Factory:
    """A helper that makes an error from its parameters, e.g. `invalid_field`."""

    error: str
    params: tuple[str, ...]
    reason_param: str
    reason_default: str | None
    message: ast.expr | None


def error_classes() -> dict[str, type[errors.DomainError]]:
    """DomainError and its subclasses, by name."""
    found: dict[str, type[errors.DomainError]] = {}
    pending: list[type[errors.DomainError]] = [errors.DomainError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def status_code(cls: type[errors.DomainError]) -> str:
    """The gRPC status code the API answers an error of this class with."""
    return str(status_code_of(cls("REASON", "message")).name)


def _callee(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _argument(call: ast.Call, position: int, keyword: str) -> ast.expr | None:
    for named in call.keywords:
        if named.arg == keyword:
            return named.value
    if position < len(call.args) and not any(isinstance(a, ast.Starred) for a in call.args):
        return call.args[position]
    return None


def _text(expr: ast.expr | None, bindings: dict[str, str]) -> str:
    """A message expression as a template: literal text, `{expr}` for the rest."""
    if expr is None:
        return ""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return expr.value
    if isinstance(expr, ast.JoinedStr):
        return "".join(_text(part, bindings) for part in expr.values)
    if isinstance(expr, ast.FormattedValue):
        return _text(expr.value, bindings)
    if isinstance(expr, ast.Name) and expr.id in bindings:
        return bindings[expr.id]
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
        return _text(expr.left, bindings) + _text(expr.right, bindings)
    if _is_dotted_name(expr):
        return "{" + ast.unparse(expr) + "}"
    return "{…}"


def _is_dotted_name(expr: ast.expr) -> bool:
    while isinstance(expr, ast.Attribute):
        expr = expr.value
    return isinstance(expr, ast.Name)


def _factories(trees: dict[str, ast.Module], classes: set[str]) -> dict[str, _Factory]:
    """Functions that return or raise an error class with a reason they are given."""
    found: dict[str, _Factory] = {}
    for tree in trees.values():
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            params = tuple(a.arg for a in (*function.args.posonlyargs, *function.args.args))
            defaults = dict(
                zip(
                    params[len(params) - len(function.args.defaults) :],
                    function.args.defaults,
                    strict=True,
                )
            )
            for node in ast.walk(function):
                if not isinstance(node, ast.Return | ast.Raise):
                    continue
                value = node.value if isinstance(node, ast.Return) else node.exc
                if not isinstance(value, ast.Call) or _callee(value) not in classes:
                    continue
                reason = _argument(value, 0, "reason")
                if isinstance(reason, ast.Name) and reason.id in params:
                    default = defaults.get(reason.id)
                    found[function.name] = _Factory(
                        error=str(_callee(value)),
                        params=params,
                        reason_param=reason.id,
                        reason_default=(
                            default.value
                            if isinstance(default, ast.Constant) and isinstance(default.value, str)
                            else None
                        ),
                        message=_argument(value, 1, "message"),
                    )
    return found


def raised_errors(source: Path = SOURCE) -> list[Raised]:
    """Every domain error made with a literal reason in `source`, sorted."""
    classes = error_classes()
    codes = {name: status_code(cls) for name, cls in classes.items()}
    trees = {
        path.relative_to(source.parent).as_posix(): ast.parse(path.read_text(), str(path))
        for path in sorted(source.rglob("*.py"))
    }
    factories = _factories(trees, set(classes))
    found: set[Raised] = set()
    for module, tree in trees.items():
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call):
                continue
            callee = _callee(call)
            if callee in classes:
                reason = _argument(call, 0, "reason")
                if isinstance(reason, ast.Constant) and isinstance(reason.value, str):
                    message = _text(_argument(call, 1, "message"), {})
                    found.add(Raised(reason.value, codes[callee], module, call.lineno, message))
            elif callee in factories:
                factory = factories[callee]
                position = factory.params.index(factory.reason_param)
                given = _argument(call, position, factory.reason_param)
                if given is None:
                    value = factory.reason_default
                elif isinstance(given, ast.Constant) and isinstance(given.value, str):
                    value = given.value
                else:
                    value = None
                if value is None:
                    continue
                bindings = {}
                for index, param in enumerate(factory.params):
                    argument = _argument(call, index, param)
                    if argument is not None:
                        bindings[param] = _text(argument, {})
                message = _text(factory.message, bindings)
                found.add(Raised(value, codes[factory.error], module, call.lineno, message))
    return sorted(found)


def render_reasons(raised: Sequence[Raised]) -> list[str]:
    out = [
        "## Error reasons",
        "",
        "A failed call answers with a gRPC status code and, in the "
        "`grpc-status-details-bin` trailer, a `google.rpc.Status` whose details "
        f"hold a `google.rpc.ErrorInfo` (domain `{ERROR_DOMAIN}`) with one of "
        "these reasons. They are stable: match on the reason, not on the message. "
        "INVALID_ARGUMENT errors also carry a `google.rpc.BadRequest` naming the "
        "bad fields, FAILED_PRECONDITION ones a `google.rpc.PreconditionFailure` "
        "and RESOURCE_EXHAUSTED ones a `google.rpc.QuotaFailure` (when there is "
        "something to name). A failed deployment or reinstall reports the same "
        "reasons in `ServerEvent.error_reason`, with the code name in "
        "`error_code`. An unexpected error is INTERNAL without details.",
        "",
        "The reasons whose code is INTERNAL are those of the provisioner's "
        "background work: they reach clients only in a FAILED `ServerEvent` "
        "(`error_reason`). The message column shows the most common message of "
        "each reason, `{...}` standing for values filled in at run time.",
        "",
        "| Reason | Code | Message (example) |",
        "|---|---|---|",
    ]
    messages: dict[tuple[str, str], Counter[str]] = {}
    for item in raised:
        messages.setdefault((item.reason, item.code), Counter())[item.message] += 1
    for (reason, code), counted in sorted(messages.items()):
        # The most common message; among equals the shortest, then the first in order.
        message = min(counted, key=lambda m: (-counted[m], len(m), m))
        out.append(f"| `{reason}` | {code} | {cell(message)} |")
    out.append("")
    return out


def render(descriptors: descriptor_pb2.FileDescriptorSet, raised: Sequence[Raised]) -> str:
    api = Api([f for f in descriptors.file if f.package == PACKAGE])
    services = [s.name for f in api.files for s in f.service]
    out = [
        f"# {PACKAGE} API reference",
        "",
        "<!-- Generated by scripts/api_reference.py (`make docs`) from "
        f"protos/{PACKAGE_DIR.as_posix()}/*.proto and the errors raised in src/bms_image. "
        "Do not edit by hand. -->",
        "",
        f"Generated from the comments of `protos/{PACKAGE_DIR.as_posix()}/` and "
        "the errors raised in `src/bms_image` by `make docs`; do not edit it by hand. "
        "Field names are the proto names (the JSON names are their lowerCamelCase "
        "forms); every call but health and reflection needs an "
        "`authorization: Bearer <token>` metadata entry.",
        "",
        "- Services: " + ", ".join(f"[{name}](#{anchor(name)})" for name in services),
        "- [Messages](#messages)",
        "- [Enums](#enums)",
        "- [Error reasons](#error-reasons)",
        "",
    ]
    out += render_services(api)
    out += render_messages(api)
    out += render_enums(api)
    out += render_reasons(raised)
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--output",
        default=str(DEFAULT_OUTPUT),
        help="where to write the Markdown (default docs/api.md; - for stdout)",
    )
    args = parser.parse_args(argv)
    text = render(compile_protos(), raised_errors())
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
