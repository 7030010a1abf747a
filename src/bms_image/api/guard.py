"""One place for what every call of our services needs: a verified caller,
domain errors turned into rich statuses, and no traceback ever sent back."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_status import rpc_status

from ..auth import TokenAuthority, bearer_token
from ..domain.errors import DomainError
from ..domain.model import Caller
from .context import reset_caller, set_caller
from .status import to_rpc_status

log = logging.getLogger(__name__)

GUARDED_PREFIX = "/bms.image.v1."


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: DomainError) -> None:
    status = rpc_status.to_status(to_rpc_status(error))
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


class CallGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, authority: TokenAuthority) -> None:
        self._authority = authority

    def authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Caller, str]:
        metadata = dict(context.invocation_metadata() or ())
        token = bearer_token(metadata.get("authorization"))
        return self._authority.verify(token), token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(GUARDED_PREFIX):
            return handler
        return self._wrap(handler, details.method)

    async def _fail(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, error: Exception
    ) -> None:
        if isinstance(error, DomainError):
            await abort_with(context, error)
        log.exception("unexpected error in %s", method, exc_info=error)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; the service logged it")

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.response_streaming:
            inner_stream = handler.unary_stream or handler.stream_stream

            async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    token = set_caller(*self.authenticate(context))
                except DomainError as error:
                    await abort_with(context, error)
                try:
                    async for response in inner_stream(request, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    await self._fail(context, method, error)
                finally:
                    reset_caller(token)

            factory = (
                grpc.unary_stream_rpc_method_handler
                if handler.unary_stream
                else grpc.stream_stream_rpc_method_handler
            )
            return factory(
                streaming,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        inner_unary = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: Any) -> Any:
            try:
                token = set_caller(*self.authenticate(context))
            except DomainError as error:
                await abort_with(context, error)
            try:
                return await inner_unary(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await self._fail(context, method, error)
            finally:
                reset_caller(token)

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
