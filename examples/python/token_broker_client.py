"""A small Python client for token-broker's gRPC API on its Unix socket.

    from token_broker_client import get_id_token, watch_id_token

    token = get_id_token("https://my-service-abc-uc.a.run.app")
    headers = {"Authorization": f"Bearer {token.token}"}

    for token in watch_id_token("https://api.example.com"):  # now, then each refresh
        use(token.token)

The socket is `$TOKEN_BROKER_SOCKET`, else the broker's default path. The
stubs are generated from proto/ by `python generate_stubs.py` (grpcio-tools)
into ./generated, or the folder `$TOKEN_BROKER_STUBS_DIR` names.

Failures raise `TokenBrokerError`, whose `code` is the gRPC status
(`grpc.StatusCode.INVALID_ARGUMENT`, `PERMISSION_DENIED`, `UNAVAILABLE`, ...)
and whose `message` is the broker's explanation.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import sys
from typing import Iterator, Optional, Union

import grpc
from google.protobuf import duration_pb2

_STUBS = pathlib.Path(
    os.environ.get(
        "TOKEN_BROKER_STUBS_DIR", pathlib.Path(__file__).resolve().parent / "generated"
    )
)
if str(_STUBS) not in sys.path:
    sys.path.insert(0, str(_STUBS))
try:
    from tokenbroker.v1 import token_broker_pb2, token_broker_pb2_grpc
except ImportError as error:  # pragma: no cover - a setup problem, said plainly
    raise ImportError(
        f"token-broker gRPC stubs not found in {_STUBS}: run "
        "`python generate_stubs.py` (pip install -r requirements.txt first)"
    ) from error

#: How long a `get_id_token` call may wait (the broker may be fetching upstream).
DEFAULT_TIMEOUT = 30.0

MinValidFor = Union[None, float, int, datetime.timedelta]


class TokenBrokerError(Exception):
    """The broker answered with a gRPC error status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class IdToken:
    """A Google-signed ID token and what the broker knows about it."""

    token: str = dataclasses.field(repr=False)  # never printed by accident
    expire_time: datetime.datetime
    issue_time: datetime.datetime
    identity: str
    audience: str


def default_socket_path() -> str:
    """`$TOKEN_BROKER_SOCKET`, else the broker's default for this user."""
    path = os.environ.get("TOKEN_BROKER_SOCKET")
    if path:
        return path
    if os.geteuid() == 0:
        return "/run/token-broker/broker.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    return os.path.join(runtime, "token-broker.sock")


class TokenBrokerClient:
    """One channel to the broker; reuse it (it is thread-safe) or close it."""

    def __init__(self, socket_path: Optional[str] = None, *, timeout: float = DEFAULT_TIMEOUT):
        path = os.path.abspath(socket_path or default_socket_path())
        self._timeout = timeout
        # gRPC Python sends the socket path as the HTTP/2 :authority for
        # unix: targets, which the broker's HTTP/2 stack rejects; name a host.
        self._channel = grpc.insecure_channel(
            f"unix://{path}", options=[("grpc.default_authority", "localhost")]
        )
        self._stub = token_broker_pb2_grpc.TokenBrokerStub(self._channel)

    def get_id_token(
        self,
        audience: str,
        identity: Optional[str] = None,
        min_valid_for: MinValidFor = None,
    ) -> IdToken:
        """A token for `audience` with at least `min_valid_for` of life left."""
        request = _request(audience, identity, min_valid_for)
        try:
            reply = self._stub.GetIdToken(request, timeout=self._timeout)
        except grpc.RpcError as error:
            raise _error(error) from None
        return _from_proto(reply)

    def watch_id_token(
        self,
        audience: str,
        identity: Optional[str] = None,
        min_valid_for: MinValidFor = None,
    ) -> Iterator[IdToken]:
        """Yields the current token at once, then each refreshed one.

        Runs until the caller stops iterating (or closes the generator);
        the broker keeps the token fresh for as long as someone watches.
        """
        call = self._stub.WatchIdToken(_request(audience, identity, min_valid_for))
        try:
            for reply in call:
                yield _from_proto(reply)
        except grpc.RpcError as error:
            raise _error(error) from None
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "TokenBrokerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def get_id_token(
    audience: str,
    identity: Optional[str] = None,
    min_valid_for: MinValidFor = None,
    *,
    socket_path: Optional[str] = None,
) -> IdToken:
    """One-shot `TokenBrokerClient.get_id_token` on a fresh channel."""
    with TokenBrokerClient(socket_path) as client:
        return client.get_id_token(audience, identity, min_valid_for)


def watch_id_token(
    audience: str,
    identity: Optional[str] = None,
    min_valid_for: MinValidFor = None,
    *,
    socket_path: Optional[str] = None,
) -> Iterator[IdToken]:
    """`TokenBrokerClient.watch_id_token` on a channel closed when iteration ends."""
    with TokenBrokerClient(socket_path) as client:
        yield from client.watch_id_token(audience, identity, min_valid_for)


def _request(audience: str, identity: Optional[str], min_valid_for: MinValidFor):
    request = token_broker_pb2.GetIdTokenRequest(audience=audience, identity=identity or "")
    if min_valid_for is not None:
        if not isinstance(min_valid_for, datetime.timedelta):
            min_valid_for = datetime.timedelta(seconds=min_valid_for)
        duration = duration_pb2.Duration()
        duration.FromTimedelta(min_valid_for)
        request.min_valid_for.CopyFrom(duration)
    return request


def _timestamp(ts) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(
        ts.seconds + ts.nanos / 1e9, tz=datetime.timezone.utc
    )


def _from_proto(reply) -> IdToken:
    return IdToken(
        token=reply.token,
        expire_time=_timestamp(reply.expire_time),
        issue_time=_timestamp(reply.issue_time),
        identity=reply.identity,
        audience=reply.audience,
    )


def _error(error: grpc.RpcError) -> TokenBrokerError:
    # Every RpcError raised by a call is also a grpc.Call with code/details.
    return TokenBrokerError(error.code(), error.details() or "")
