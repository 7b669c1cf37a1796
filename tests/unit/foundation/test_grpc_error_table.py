"""The one table between swarm errors and gRPC codes, both ways."""

import grpc
import pytest

from swarm import errors
from swarm.transport.errors import error_from_rpc, grpc_errors, status_code_for, translate_rpc_errors


@pytest.mark.parametrize("exc, code", [
    (errors.InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ConfigError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.AuthError("x"), grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError("x"), grpc.StatusCode.PERMISSION_DENIED),
    (errors.CapacityError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.InfeasiblePlanError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.NotFoundError("x"), grpc.StatusCode.NOT_FOUND),
    (errors.VersionMismatchError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.UnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
    (KeyError("x"), grpc.StatusCode.INTERNAL),
])
def test_status_for_error(exc, code):
    assert status_code_for(exc) == code


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidRequestError),
    (grpc.StatusCode.UNAUTHENTICATED, errors.AuthError),
    (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDeniedError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.CapacityError),
    (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
    (grpc.StatusCode.FAILED_PRECONDITION, errors.VersionMismatchError),
    (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.UnavailableError),
    (grpc.StatusCode.INTERNAL, errors.PeerError),
])
def test_error_for_status(code, cls):
    err = error_from_rpc(FakeRpcError(code, "what to do"), "coordinator")
    assert type(err) is cls
    with pytest.raises(cls):
        with translate_rpc_errors("coordinator"):
            raise FakeRpcError(code, "d")


class FakeContext:
    def __init__(self):
        self.aborted = None

    def code(self):
        return self.aborted[0] if self.aborted else None

    def abort(self, code, details):
        self.aborted = (code, details)
        raise Exception()  # what grpc does


class Svc:
    @grpc_errors
    def Unary(self, request, context):
        raise request

    @grpc_errors
    def Stream(self, request, context):
        yield 1
        raise request


def test_decorator_maps_and_hides_internals():
    ctx = FakeContext()
    with pytest.raises(Exception):
        Svc().Unary(errors.AuthError("wrong token; use the printed one"), ctx)
    assert ctx.aborted == (grpc.StatusCode.UNAUTHENTICATED, "wrong token; use the printed one")
    ctx = FakeContext()
    with pytest.raises(Exception):
        list(Svc().Stream(ZeroDivisionError("secret internals"), ctx))
    assert ctx.aborted[0] == grpc.StatusCode.INTERNAL and "secret" not in ctx.aborted[1]
