"""The ClientHello server-name parser the relay routes by (swarm/transport/sni.py): real
ClientHellos from Python's ssl module, every truncation, and garbage."""

from __future__ import annotations

import random
import ssl
import struct

import pytest

from swarm.transport.relay import node_id_from_server_name
from swarm.transport.sni import MAX_HELLO_BYTES, NeedMoreData, NotClientHello, parse_sni


def client_hello(server_name: str | None) -> bytes:
    """The first flight of a real TLS client (a ClientHello in one record)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


NODE = "0123456789abcdef" * 2


def test_real_client_hello_names_the_node():
    hello = client_hello(f"{NODE}.node.swarm")
    assert parse_sni(hello) == f"{NODE}.node.swarm"
    assert node_id_from_server_name(parse_sni(hello)) == NODE


def test_hello_without_server_name():
    assert parse_sni(client_hello(None)) is None


def test_every_truncation_asks_for_more():
    hello = client_hello(f"{NODE}.node.swarm")
    for n in range(len(hello)):
        with pytest.raises(NeedMoreData):
            parse_sni(hello[:n])


def test_extra_bytes_after_the_record_are_ignored():
    hello = client_hello("x.node.swarm")
    assert parse_sni(hello + b"\x17\x03\x03garbage") == "x.node.swarm"


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n\r\n",
    b"\x16\x02\x00\x00\x10",  # wrong major version
    b"\x16\x03\x01\x00\x00",  # empty record
    b"\x16\x03\x01\xff\xff",  # record longer than TLS allows
    b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello, not a ClientHello
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # plaintext HTTP/2
])
def test_garbage_is_refused(data):
    with pytest.raises(NotClientHello):
        parse_sni(data)


def test_lengths_that_lie_are_refused():
    hello = bytearray(client_hello("a.node.swarm"))
    hello[6:9] = (len(hello) * 2).to_bytes(3, "big")  # handshake length past the record
    with pytest.raises(NotClientHello):
        parse_sni(bytes(hello))


def test_non_ascii_name_is_refused():
    hello = client_hello("a" * 12 + ".node.swarm")
    i = hello.index(b"aaaaaaaaaaaa")
    bad = hello[:i] + b"\xff" + hello[i + 1:]
    with pytest.raises(NotClientHello):
        parse_sni(bad)


def test_random_bytes_never_raise_anything_else():
    rng = random.Random(7)
    hello = client_hello(f"{NODE}.node.swarm")
    for _ in range(3000):
        if rng.random() < 0.5:  # a real hello with bytes flipped
            data = bytearray(hello)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        else:  # a plausible header over random bytes
            body = rng.randbytes(rng.randint(0, 600))
            data = b"\x16\x03\x01" + struct.pack(">H", len(body)) + body
        try:
            name = parse_sni(data)
        except (NeedMoreData, NotClientHello):
            continue
        assert name is None or (isinstance(name, str) and len(name) <= 253)


@pytest.mark.parametrize("name,expected", [
    (f"{NODE}.node.swarm", NODE), ("node.swarm", None), (f"{NODE}.coordinator.swarm", None),
    ("zz.node.swarm", None), (None, None), (f"{NODE.upper()}.node.swarm", None),
])
def test_node_id_from_server_name(name, expected):
    assert node_id_from_server_name(name) == expected


def test_max_hello_bytes_is_one_record():
    assert MAX_HELLO_BYTES == 5 + 16384
