"""One place for what every call of our services needs: a request id, a
verified caller, domain errors turned into rich statuses (no traceback ever
sent back), and the call counted, timed and logged."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from bms_image.common.auth import (
    SERVICE_METADATA_KEY,
    TokenAuthority,
    bearer_token,
    service_credential,
)
from bms_image.common.context import reset_caller, set_caller
from bms_image.common.errors import DomainError, InvalidArgument, PermissionDenied
from bms_image.common.model import IMAGE_SERVICE_IDENTITY, Caller
from bms_image.common.status import to_rpc_status
from bms_image.common.telemetry.logs import (
    REQUEST_ID_KEY,
    CallInfo,
    begin_call,
    end_call,
    request_id_from,
)
from bms_image.common.telemetry.metrics import ServiceMetrics

log = logging.getLogger(__name__)

GUARDED_PREFIX = "/bms.image.v1."
#: Internal services, by method prefix, and the only service identity that
#: may call them (always together with the user token it acts for).
INTERNAL_SERVICES = {"/bms.image.v1.ServerCaptureService/": IMAGE_SERVICE_IDENTITY}
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


async def abort_with(context: Context, error: DomainError, request_id: str = "") -> None:
    status = rpc_status.to_status(to_rpc_status(error))
    trailing = tuple(status.trailing_metadata or ())
    if request_id:
        trailing += ((REQUEST_ID_KEY, request_id),)
    await context.abort(status.code, status.details, trailing_metadata=trailing)


def _required_service(method: str) -> str:
    for prefix, service in INTERNAL_SERVICES.items():
        if method.startswith(prefix):
            return service
    return ""


class _Undecodable:
    """A request body that is not a valid message, kept until the caller is
    authenticated: a stranger learns UNAUTHENTICATED, a caller which message
    to fix (INVALID_ARGUMENT), never a parser's UNKNOWN."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> InvalidArgument:
        return InvalidArgument(
            "INVALID_REQUEST",
            f"the request body is not a valid {self.type_name} message; "
            "send one serialized from the bms.image.v1 protos",
        )


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    message_class = getattr(deserializer, "__self__", None)
    type_name = getattr(getattr(message_class, "DESCRIPTOR", None), "full_name", "request")

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError:
            return _Undecodable(type_name)

    return parse


def _checked(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise request.error()
    return request


def _code_name(context: Context, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return "OK" if error is None else "UNKNOWN"


class CallLimit:
    """The calls of our services running at once in one process, and their
    bound: a call beyond it is refused at once with RESOURCE_EXHAUSTED.
    Counted here rather than by the server's maximum_concurrent_rpcs, whose
    count drifts (grpc 1.85): it checks when it asks for the next call, not
    when one arrives, and a refused call also lowers it, so after a few
    refusals the process admitted more than its bound."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.running = 0

    @contextlib.contextmanager
    def admitted(self) -> Iterator[bool]:
        """True, counted while the block runs, if the call is within the bound."""
        if self.limit is not None and self.running >= self.limit:
            yield False
            return
        self.running += 1
        try:
            yield True
        finally:
            self.running -= 1

    def refusal(self) -> str:
        return (
            f"the service is at its limit of {self.limit} concurrent calls "
            "(BMS_IMAGE_MAX_CONCURRENT_RPCS); retry with backoff"
        )


class CallGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        authority: TokenAuthority,
        metrics: ServiceMetrics | None = None,
        max_concurrent_calls: int | None = None,
    ) -> None:
        self._authority = authority
        self._metrics = metrics or ServiceMetrics()
        self.calls = CallLimit(max_concurrent_calls)
        #: Guarded handlers by method, with the handler each wraps: built once,
        #: not on every call.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def authenticate(self, metadata: dict[str, Any], method: str = "") -> tuple[Caller, str]:
        """The caller (its user token, and the service identity that carried
        it, if any) and its token. UNAUTHENTICATED for a missing or bad user
        token or service credential; PERMISSION_DENIED for an internal
        method called without the service identity it needs."""
        token = bearer_token(metadata.get("authorization"))
        caller = self._authority.verify(token)
        carried = metadata.get(SERVICE_METADATA_KEY)
        if carried is not None:
            service = self._authority.verify_service(service_credential(carried))
            caller = dataclasses.replace(caller, service=service)
        required = _required_service(method)
        if required and caller.service != required:
            raise PermissionDenied(
                "SERVICE_IDENTITY_REQUIRED",
                f"{method} is internal: only the {required} calls it, with its service "
                f"credential in `{SERVICE_METADATA_KEY}` metadata; capture a server with "
                "ImageService.CreateImage and a source_server instead",
            )
        return caller, token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(GUARDED_PREFIX):
            return handler
        known = self._guarded.get(details.method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = self._wrap(handler, details.method)
        self._guarded[details.method] = (handler, guarded)
        return guarded

    async def _begin(self, context: Context, info: CallInfo) -> tuple[object, object]:
        """Authenticates the caller; aborts with UNAUTHENTICATED otherwise."""
        metadata = dict(context.invocation_metadata() or ())
        info.request_id = request_id_from(metadata.get(REQUEST_ID_KEY))
        context.set_trailing_metadata(((REQUEST_ID_KEY, info.request_id),))
        try:
            caller, token = self.authenticate(metadata, info.method)
        except DomainError as error:
            await abort_with(context, error, info.request_id)
        info.project = caller.project
        return set_caller(caller, token)

    async def _fail(self, context: Context, info: CallInfo, error: Exception) -> None:
        if isinstance(error, DomainError):
            await abort_with(context, error, info.request_id)
        log.exception("unexpected error in %s", info.method, exc_info=error)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error; the service logged it under request id {info.request_id}",
            trailing_metadata=((REQUEST_ID_KEY, info.request_id),),
        )

    def _finish(
        self, context: Context, info: CallInfo, started: float, error: BaseException | None
    ) -> None:
        elapsed = time.perf_counter() - started
        code = _code_name(context, error)
        self._metrics.rpc_finished(info.method, code, elapsed)
        if code == "OK":
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s OK in %.1f ms", info.method, elapsed * 1000)
        elif code in ("INTERNAL", "UNKNOWN", "DATA_LOSS"):
            log.warning("%s %s in %.1f ms", info.method, code, elapsed * 1000)
        else:
            log.info("%s %s in %.1f ms", info.method, code, elapsed * 1000)

    def _count_requests(self, requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
        async def counted() -> AsyncIterator[Any]:
            async for request in requests:
                request = _checked(request)
                self._metrics.streamed(method, "received", request.ByteSize())
                yield request

        return counted()

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        count_requests = handler.request_streaming
        if handler.response_streaming:
            inner_stream = handler.unary_stream or handler.stream_stream

            async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
                with self.calls.admitted() as admitted:
                    if not admitted:
                        await context.abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED, self.calls.refusal()
                        )
                    async for response in guarded_stream(request, context):
                        yield response

            async def guarded_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                started = time.perf_counter()
                info, call = begin_call("", method)
                failure: BaseException | None = None
                caller: tuple[object, object] | None = None
                try:
                    caller = await self._begin(context, info)
                    if count_requests:
                        request = self._count_requests(request, method)
                    else:
                        request = _checked(request)
                    async for response in inner_stream(request, context):
                        self._metrics.streamed(method, "sent", response.ByteSize())
                        yield response
                except (grpc.aio.AbortError, asyncio.CancelledError) as error:
                    failure = error
                    raise
                except Exception as error:
                    failure = error
                    await self._fail(context, info, error)
                finally:
                    self._finish(context, info, started, failure)
                    # A stream abandoned at shutdown is closed later by the
                    # garbage collector, in another context: nothing to reset.
                    with contextlib.suppress(ValueError):
                        if caller is not None:
                            reset_caller(caller)
                        end_call(call)

            factory = (
                grpc.unary_stream_rpc_method_handler
                if handler.unary_stream
                else grpc.stream_stream_rpc_method_handler
            )
            return factory(
                streaming,
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )

        inner_unary = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: Context) -> Any:
            with self.calls.admitted() as admitted:
                if not admitted:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.calls.refusal())
                return await guarded_unary(request, context)

        async def guarded_unary(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            info, call = begin_call("", method)
            failure: BaseException | None = None
            caller: tuple[object, object] | None = None
            try:
                caller = await self._begin(context, info)
                if count_requests:
                    request = self._count_requests(request, method)
                else:
                    request = _checked(request)
                return await inner_unary(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError) as error:
                failure = error
                raise
            except Exception as error:
                failure = error
                await self._fail(context, info, error)
            finally:
                if caller is not None:
                    reset_caller(caller)
                self._finish(context, info, started, failure)
                end_call(call)

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(
            unary,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
