"""Golden bytes of every frame gochan sends, and the compiled core against its
pure-Python twin."""

from __future__ import annotations

import random

import orjson
import pytest

import gochan._fast as fast
from gochan._fast import HEARTBEAT, core, encode_event, encode_system, pure
from gochan.frames import CLIENT_CLOSED_FRAME, subscription_failure_frame


def test_compiled_core_is_in_use() -> None:
    assert core.__file__ is not None and core.__file__.endswith((".so", ".pyd"))
    assert fast.Hub is core.Hub and fast.encode_event is core.encode_event
    assert type(core.encode_event).__name__ in (
        "cython_function_or_method",
        "builtin_function_or_method",
    )


def test_first_frame_bytes() -> None:
    first = {
        "config": {"client_id": "abc", "client_ttl_millis": 60000},
        "subscriptions": ["topic1", "topic2"],
    }
    assert encode_system(orjson.dumps(first)) == (
        b"event: message\n"
        b'data: {"config":{"client_id":"abc","client_ttl_millis":60000},'
        b'"subscriptions":["topic1","topic2"]}\n\n'
    )


def test_three_line_body_with_crlf_lf_and_cr() -> None:
    frame = encode_event("news", "e1-7", b"one\r\ntwo\nthree\rfour")
    assert frame == b"event: news\nid: e1-7\ndata: one\ndata: two\ndata: three\ndata: four\n\n"


def test_body_edges() -> None:
    assert encode_event("t", "1", b"") == b"event: t\nid: 1\ndata: \n\n"
    assert encode_event("t", "1", b"x\n") == b"event: t\nid: 1\ndata: x\ndata: \n\n"
    assert encode_event("t", "1", b"\r\n\r\n") == b"event: t\nid: 1\ndata: \ndata: \ndata: \n\n"
    assert encode_event("t", "1", b"\r") == b"event: t\nid: 1\ndata: \ndata: \n\n"
    assert encode_event("t", None, b"a") == b"event: t\ndata: a\n\n"
    assert encode_event("caf\u00e9", "1", "\u00e9".encode()) == (
        "event: caf\u00e9\nid: 1\ndata: \u00e9\n\n".encode()
    )


def test_heartbeat_bytes() -> None:
    assert HEARTBEAT == b":\n\n"


def test_subscription_failure_bytes() -> None:
    assert subscription_failure_frame("T", "broker down") == (
        b"event: message\n"
        b'data: {"error":{"code":"subscription-failure","message":"broker down","topic":"T"}}\n\n'
    )


def test_client_closed_bytes() -> None:
    assert CLIENT_CLOSED_FRAME == b"event: message\ndata: Client closed\n\n"


@pytest.mark.parametrize("seed", range(5))
def test_encoder_matches_pure_twin(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = [b"a", b"b", b"\r", b"\n", b"\r\n", b" ", b"\x00", "\u00e9".encode()]
    for _ in range(500):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        event_id = rng.choice([None, "x-1", "0"])
        assert encode_event("t", event_id, data) == pure.encode_event("t", event_id, data)
    assert encode_system(b"a\nb") == pure.encode_system(b"a\nb")
