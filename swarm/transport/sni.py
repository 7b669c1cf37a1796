"""The server name (SNI) of a TLS ClientHello, read without terminating TLS.

A relay (swarm/transport/relay.py) routes a raw TCP connection to the relayed node whose name
the client asked for: every swarm client dials a node as ``<node id>.node.swarm`` (grpc puts
``ssl_target_name_override`` in the ClientHello's server_name extension, RFC 6066 section 3).
Only the first TLS record is read, and only as far as the server_name extension; nothing
else of the handshake is interpreted, so the relay cannot read or alter the session.

:func:`parse_sni` is pure: bytes in, a name out. It raises :class:`NeedMoreData` while the
record is incomplete (read more, up to :data:`MAX_HELLO_BYTES`) and :class:`NotClientHello`
for anything else (garbage, another protocol, a ClientHello spread over several records, a
name that is not ASCII): the caller closes the connection.
"""

from __future__ import annotations

import struct

RECORD_HEADER_BYTES = 5
MAX_RECORD_BYTES = 16384  # TLS plaintext record limit (RFC 8446 section 5.1)
MAX_HELLO_BYTES = RECORD_HEADER_BYTES + MAX_RECORD_BYTES
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000
_HOST_NAME = 0x00


class NeedMoreData(Exception):
    """The bytes so far are a valid prefix of a ClientHello record: read more."""


class NotClientHello(ValueError):
    """Not a TLS ClientHello with a host name this parser accepts: close the connection."""


class _Reader:
    """Bounds-checked big-endian reads over one buffer; running past the end is NotClientHello
    (the record's length already said how much there is)."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise NotClientHello("ClientHello field runs past its record")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u24(self) -> int:
        b = self.take(3)
        return (b[0] << 16) | (b[1] << 8) | b[2]

    def vector(self, length_bytes: int) -> memoryview:
        n = self.u8() if length_bytes == 1 else self.u16()
        return self.take(n)


def record_length(head: bytes) -> int:
    """Total bytes of the TLS record starting ``head`` (header included). NeedMoreData if fewer
    than 5 bytes; NotClientHello if it is not a handshake record of a plausible size."""
    if len(head) >= 1 and head[0] != _HANDSHAKE:
        raise NotClientHello(f"first byte 0x{head[0]:02x} is not a TLS handshake record")
    if len(head) >= 2 and head[1] != 0x03:
        raise NotClientHello("not a TLS record (major version is not 3)")
    if len(head) < RECORD_HEADER_BYTES:
        raise NeedMoreData
    (length,) = struct.unpack(">H", head[3:5])
    if not 4 <= length <= MAX_RECORD_BYTES:
        raise NotClientHello(f"TLS record length {length} is out of range")
    return RECORD_HEADER_BYTES + length


def parse_sni(data: bytes) -> str | None:
    """The host name of the ClientHello at the start of ``data`` (lower-cased), or None when it
    carries no server_name. Raises NeedMoreData / NotClientHello (see the module docstring)."""
    total = record_length(data)
    if len(data) < total:
        raise NeedMoreData
    r = _Reader(memoryview(data)[RECORD_HEADER_BYTES:total])
    if r.u8() != _CLIENT_HELLO:
        raise NotClientHello("the first handshake message is not a ClientHello")
    hello_len = r.u24()
    if hello_len != len(r.data) - r.pos:  # a hello split across records: swarm's never are
        raise NotClientHello("the ClientHello does not fill exactly one record")
    r.take(2 + 32)  # legacy_version, random
    r.vector(1)  # legacy_session_id
    r.vector(2)  # cipher_suites
    r.vector(1)  # legacy_compression_methods
    if r.pos == len(r.data):
        return None  # no extensions at all
    ext = _Reader(r.vector(2))
    if r.pos != len(r.data):
        raise NotClientHello("bytes after the ClientHello's extensions")
    while ext.pos < len(ext.data):
        kind, body = ext.u16(), ext.vector(2)
        if kind != _SERVER_NAME:
            continue
        names = _Reader(_Reader(body).vector(2))
        while names.pos < len(names.data):
            name_type, name = names.u8(), names.vector(2)
            if name_type == _HOST_NAME:
                return _host_name(bytes(name))
        return None
    return None


def _host_name(raw: bytes) -> str:
    if not 1 <= len(raw) <= 253:
        raise NotClientHello("server_name length is out of range")
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise NotClientHello("server_name is not ASCII") from exc
    if not all(c.isalnum() or c in "-." for c in name):
        raise NotClientHello("server_name has characters no host name has")
    return name.lower()
