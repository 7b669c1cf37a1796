"""One table between swarm errors and gRPC status codes, for servicers and for clients.

Servicers decorate every RPC method with :func:`grpc_errors`: a :class:`~swarm.errors.SwarmError`
raised inside becomes the status in ``_CODE_FOR_ERROR`` with the error's message (which says
what to do); any other exception becomes ``INTERNAL`` and is logged with its traceback, so a
client's mistake or our bug fails one call and never takes the server down::

    class MyServicer(my_pb2_grpc.MyServicer):
        @grpc_errors
        def DoThing(self, request, context): ...

Clients wrap calls in :func:`translate_rpc_errors` (a context manager) or call
:func:`error_from_rpc` to get the swarm error back from a ``grpc.RpcError``::

    with translate_rpc_errors("coordinator at 10.0.0.1:7000"):
        reply = stub.Heartbeat(request, timeout=5)
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc

from swarm import errors

log = logging.getLogger(__name__)

# Most specific first: the first matching class wins.
_CODE_FOR_ERROR: tuple[tuple[type[errors.SwarmError], grpc.StatusCode], ...] = (
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.VersionMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.PeerError, grpc.StatusCode.UNAVAILABLE),
)

_ERROR_FOR_CODE: dict[grpc.StatusCode, type[errors.SwarmError]] = {
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.VersionMismatchError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.CapacityError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.UnavailableError,
    grpc.StatusCode.CANCELLED: errors.UnavailableError,
}

F = TypeVar("F", bound=Callable)


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status a servicer returns for ``exc``."""
    for cls, code in _CODE_FOR_ERROR:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    code = status_code_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error in %s", method, exc_info=exc)
        message = f"internal error in {method} ({type(exc).__name__}); see the server's log"
    else:
        log.info("%s refused: code=%s %s", method, code.name, exc)
        message = str(exc) or type(exc).__name__
    context.abort(code, message)


def _already_aborted(context: grpc.ServicerContext) -> bool:
    # context.abort() raises a bare Exception after setting the code: let it through.
    try:
        return context.code() is not None
    except Exception:  # a context without code() (tests' fakes): treat as not aborted
        return False


def grpc_errors(fn: F) -> F:
    """Decorate a servicer method (unary or streaming response) to map errors to statuses."""
    method = fn.__qualname__

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(self, request, context):
            try:
                yield from fn(self, request, context)
            except Exception as exc:  # noqa: BLE001 -- the one place errors become statuses
                if _already_aborted(context):
                    raise
                _abort(context, exc, method)

        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 -- the one place errors become statuses
            if _already_aborted(context):
                raise
            _abort(context, exc, method)

    return wrapper  # type: ignore[return-value]


# What gRPC says when the other side speaks HTTP/1 (say the coordinator's --http-port was given
# instead of its gRPC port): "Trying to connect an http1.x server", or a failed HTTP/2 preface.
_HTTP1_MARKERS = ("trying to connect an http1.x server", "failed parsing http/2")


def _answers_http1(details: str) -> bool:
    low = details.lower()
    return any(m in low for m in _HTTP1_MARKERS)


def _address_in(what: str) -> str:
    # "coordinator at HOST:PORT" -> "HOST:PORT"; anything else is shown as given
    return what.rsplit(" at ", 1)[-1]


def http_port_error(address: str) -> errors.WrongProtocolError:
    """The error for ``address`` answering HTTP where the coordinator's gRPC port was expected
    (the one message, whether gRPC or the TLS CA fetch noticed it)."""
    return errors.WrongProtocolError(
        f"{address} answers HTTP, not gRPC: is that the coordinator's --http-port? use its gRPC port (READY port=...)")


def error_from_rpc(exc: grpc.RpcError, what: str = "peer") -> errors.SwarmError:
    """The swarm error for a failed call; ``what`` names the other side in the message
    (``"coordinator at HOST:PORT"``). An address that answers HTTP/1 gives WrongProtocolError."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and \
            _answers_http1(details or ""):
        err = http_port_error(_address_in(what))
        err.grpc_code = code  # type: ignore[attr-defined]
        return err
    cls = _ERROR_FOR_CODE.get(code, errors.PeerError)
    if cls is errors.UnavailableError:
        return errors.UnavailableError(f"{what} is unreachable ({code.name if code else '?'}: {details})")
    err = cls(details or f"{what} answered {code.name if code else 'an error'}")
    err.grpc_code = code  # type: ignore[attr-defined]
    return err


@contextmanager
def translate_rpc_errors(what: str = "peer") -> Iterator[None]:
    """Re-raise any ``grpc.RpcError`` inside the block as the matching swarm error."""
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from_rpc(exc, what) from exc
