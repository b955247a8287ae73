"""HTTP/1.1 handling over raw sockets: pipelining, bodies, limits, bad input."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.support import SSEStream, raw_request, running


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """Split raw HTTP/1.1 responses (Content-Length framed) into (status, body)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        out.append((status, rest[:length]))
        data = rest[length:]
    return out


async def test_pipelined_keep_alive_requests_answer_in_order() -> None:
    async with running() as server:
        client = await SSEStream.open(server.port, "/events")
        client_id = (await client.config())["config"]["client_id"]
        update = b'{"client_id":"%s","add":["p"]}' % client_id.encode()
        batch = (
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"POST /update_subscriptions HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            b"POST /publish?topic=p HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        ) % (len(update), update)
        got = responses(await raw_request(server.port, batch))
        assert [s for s, _ in got] == [200, 200, 200, 404, 200]
        assert got[0][1] == b"ok\n" and b'"subscriptions":["p"]' in got[1][1]
        assert (await client.event())["data"] == "hello"
        await client.close()


async def test_pipelined_requests_split_across_writes() -> None:
    async with running() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        payload = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n" * 3
        for i in range(0, len(payload), 7):
            writer.write(payload[i : i + 7])
            await writer.drain()
            await asyncio.sleep(0)
        data = b""
        while data.count(b"ok\n") < 3:
            data += await asyncio.wait_for(reader.read(4096), 5)
        assert [s for s, _ in responses(data)] == [200, 200, 200]
        writer.close()


async def test_chunked_request_body() -> None:
    async with running() as server:
        stream = await SSEStream.open(server.port, "/events?topic=c")
        await stream.config()
        body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        request = (
            b"POST /publish?topic=c HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + body
        )
        assert responses(await raw_request(server.port, request))[0][0] == 200
        assert (await stream.event())["data"] == "hello world"
        await stream.close()


async def test_expect_100_continue() -> None:
    async with running() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /publish?topic=e HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"abc")
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert final.startswith(b"HTTP/1.1 200 OK")
        writer.close()
        # Too large: refused before the body is sent, no 100.
        answer = await raw_request(
            server.port,
            b"POST /publish?topic=e HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999\r\n"
            b"Expect: 100-continue\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 413")


async def test_head_requests_have_no_body() -> None:
    async with running() as server:
        data = await raw_request(
            server.port,
            b"HEAD /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"HEAD /events HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        first, _, rest = data.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200") and b"Content-Length: 3" in first
        assert rest.startswith(b"HTTP/1.1 200") and b"text/event-stream" in rest
        assert rest.endswith(b"\r\n\r\n")  # no body, no stream
        assert server.streamer.count_clients() == 0  # HEAD creates no client


async def test_malformed_http_gets_400_and_close_and_hurts_nobody() -> None:
    async with running() as server, httpx.AsyncClient() as http:
        stream = await SSEStream.open(server.port, "/events?topic=safe")
        await stream.config()
        bad_inputs = [
            b"THIS IS NOT HTTP\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
            b"GET /healthz HTTP/9.9\r\n\r\n",
            b"POST /publish?topic=x HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            b"POST /publish?topic=x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"\x00\x01\x02\xff" * 10,
            b"GET /events HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        ]
        for bad in bad_inputs:
            answer = await raw_request(server.port, bad)
            assert answer.startswith(b"HTTP/1.1 400"), (bad, answer)
            assert b"Connection: close" in answer
        # The server and the other stream are fine.
        r = await http.post(f"http://127.0.0.1:{server.port}/publish?topic=safe", content=b"ok")
        assert r.status_code == 200
        assert (await stream.event())["data"] == "ok"
        assert server.bad_requests == len(bad_inputs)
        await stream.close()


async def test_size_limits() -> None:
    async with running(max_url_bytes=100, max_header_bytes=300, max_body_bytes=10) as server:
        long_url = b"GET /events?topic=" + b"a" * 200 + b" HTTP/1.1\r\n\r\n"
        assert (await raw_request(server.port, long_url)).startswith(b"HTTP/1.1 431")
        big_headers = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 400 + b"\r\n\r\n"
        assert (await raw_request(server.port, big_headers)).startswith(b"HTTP/1.1 431")
        many = b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X%d: 1\r\n" % i for i in range(150))
        assert (await raw_request(server.port, many + b"\r\n")).startswith(b"HTTP/1.1 431")
        body = b"POST /publish?topic=a HTTP/1.1\r\nContent-Length: 11\r\n\r\n" + b"x" * 11
        assert (await raw_request(server.port, body)).startswith(b"HTTP/1.1 413")
        chunked = (
            b"POST /publish?topic=a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"8\r\n12345678\r\n" * 3
        )
        assert (await raw_request(server.port, chunked)).startswith(b"HTTP/1.1 413")


async def test_slow_headers_time_out() -> None:
    async with running(header_timeout=0.3) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 408")
        writer.close()
        # A connection that never sends a byte is closed too.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_idle_keep_alive_connections_are_closed() -> None:
    async with running(keepalive_timeout=0.3) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok\n")
        writer.close()


async def test_max_connections() -> None:
    async with running(max_connections=2) as server:
        streams = [await SSEStream.open(server.port, "/events") for _ in range(2)]
        refused = await raw_request(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 503")
        await streams[0].close()
        await asyncio.sleep(0.1)
        again = await SSEStream.open(server.port, "/events")
        assert again.status == 200
        for s in (streams[1], again):
            await s.close()


async def test_data_sent_on_a_stream_is_ignored() -> None:
    async with running() as server:
        stream = await SSEStream.open(server.port, "/events?topic=t")
        await stream.config()
        stream.writer.write(b"garbage that is not read\r\n\r\n" * 100)
        await server.streamer.publish("t", b"still here")
        assert (await stream.event())["data"] == "still here"
        await stream.close()


async def test_query_strings_decode_like_browsers_send_them() -> None:
    async with running(max_url_bytes=65536) as server:
        target = "/events?topic=caf%C3%A9&topic=a+b&&topic=x&id="  # an empty id: a new client
        stream = await SSEStream.open(server.port, target)
        assert (await stream.config())["subscriptions"] == ["caf\u00e9", "a b", "x"]
        await stream.close()
        many = "&".join(f"topic=t{i}" for i in range(1200))
        answer = await raw_request(
            server.port, f"GET /events?{many} HTTP/1.1\r\nConnection: close\r\n\r\n".encode()
        )
        assert answer.startswith(b"HTTP/1.1 400") and b"query parameters" in answer


def test_the_prebuilt_json_answer_is_the_general_one() -> None:
    """json_ok (the publish answer's path) writes byte for byte what
    simple_response writes for a 200 JSON answer on a keep-alive connection,
    and follows the Date as it is refreshed."""
    from gochan.server import http

    for body in (b'{"id":"5f3a9c1e-42"}', b'{"id":null}', b""):
        assert http.json_ok(body) == http.simple_response(200, body, content_type=http.JSON)
    http._date = b"Date: Thu, 01 Jan 1970 00:00:00 GMT\r\n"  # as if the clock had moved
    try:
        http.refresh_date()
        assert http.json_ok(b"{}") == http.simple_response(200, b"{}", content_type=http.JSON)
        assert b"1970" not in http.json_ok(b"{}")
    finally:
        http.refresh_date()


def test_a_stream_head_is_kept_until_the_date_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from gochan.server import http

    headers = [(b"Content-Type", b"text/event-stream"), (b"X-Gochan-Node", b"n1")]
    first = http.stream_head(headers)
    assert first == http.response_head(200, headers)
    assert http.stream_head(headers) is first  # kept
    monkeypatch.setattr(http, "formatdate", lambda usegmt: "Thu, 01 Jan 2099 00:00:00 GMT")
    http.refresh_date()
    later = http.stream_head(headers)
    assert b"Date: Thu, 01 Jan 2099" in later and later == http.response_head(200, headers)
    monkeypatch.undo()
    http.refresh_date()
