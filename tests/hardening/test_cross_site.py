"""The keyless loopback mode against other web pages: a page on any site
could POST text/plain to 127.0.0.1 with no preflight, and a rebound DNS name
could reach it as its own origin (issue 10, item 5)."""

from __future__ import annotations

import httpx

from tests.support import SSEStream, running


async def test_a_foreign_origin_cannot_publish_or_update() -> None:
    async with running(cors_origins=["https://app.example"]) as server, httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{server.port}"
        stream = await SSEStream.open(server.port, "/events?topic=t")
        client_id = (await stream.config())["config"]["client_id"]
        evil = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
        r = await http.post(f"{base}/publish?topic=t", content=b"x", headers=evil)
        assert r.status_code == 403 and "Origin" in r.text
        update = f'{{"client_id":"{client_id}","add":["u"]}}'.encode()
        r = await http.post(f"{base}/update_subscriptions", content=update, headers=evil)
        assert r.status_code == 403
        r = await http.post(f"{base}/publish?topic=t", content=b"x", headers={"Origin": "null"})
        assert r.status_code == 403
        # Allowed: the CORS list, the server's own origin, and no Origin at all.
        for headers in ({"Origin": "https://app.example"}, {"Origin": base}, {}):
            r = await http.post(f"{base}/publish?topic=t", content=b"ok", headers=headers)
            assert r.status_code == 200, (headers, r.text)
            assert (await stream.event())["data"] == "ok"
        assert server.streamer.client_topics(client_id) == ["t"]
        await stream.no_frame()
        await stream.close()


async def test_a_rebound_host_name_cannot_publish_without_a_key() -> None:
    async with running() as server, httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{server.port}"
        for host in ("attacker.example", f"attacker.example:{server.port}", "127.0.0.1.nip.io"):
            r = await http.post(f"{base}/publish?topic=t", content=b"x", headers={"Host": host})
            assert r.status_code == 403 and "Host" in r.text, (host, r.text)
        # Same-origin from the rebound name is refused too: the Host decides.
        r = await http.post(
            f"{base}/publish?topic=t",
            content=b"x",
            headers={"Host": "attacker.example", "Origin": "http://attacker.example"},
        )
        assert r.status_code == 403
        for host in (
            "localhost",
            f"localhost:{server.port}",
            "127.0.0.1",
            "[::1]:80",
            "a.localhost",
        ):
            r = await http.post(f"{base}/publish?topic=t", content=b"x", headers={"Host": host})
            assert r.status_code == 200, (host, r.text)


async def test_allowed_hosts_and_a_publish_key_lift_the_host_check() -> None:
    async with running(allowed_hosts=["gochan.internal"]) as server, httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{server.port}/publish?topic=t"
        r = await http.post(url, content=b"x", headers={"Host": "gochan.internal:3000"})
        assert r.status_code == 200
    async with running(publish_key="k") as server, httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{server.port}/publish?topic=t"
        headers = {"Host": "gochan.example", "Authorization": "Bearer k"}
        assert (await http.post(url, content=b"x", headers=headers)).status_code == 200


def test_the_host_check_is_remembered_per_value_and_bounded() -> None:
    """The loopback Host check is kept per distinct Host (publishers send the
    same one every time), answers as the check itself does, and a stranger's
    stream of distinct values cannot grow the table past its bound."""
    from gochan import Config, Streamer
    from gochan.server import routes

    config = Config(allowed_hosts=["app.internal"])
    router = routes.Router(Streamer(config), config, lambda accept: (b"", ""))
    hosts = [
        "127.0.0.1:3000", "localhost", "LOCALHOST:80", "a.localhost", "[::1]:3000",
        "127.0.0.1.nip.io", "attacker.example", "app.internal:8080", "10.0.0.1", "[::2]",
    ]  # fmt: skip
    want = [True, True, True, True, True, False, False, True, False, False]
    assert [router._judge_host(h) for h in hosts] == want
    for _ in range(2):  # the first answer computed, the second remembered
        assert [router._local_host(h) for h in hosts] == want
    for i in range(3 * routes.HOST_ANSWERS_KEPT):
        assert router._local_host(f"host{i}.example") is False
        assert len(router._host_answers) <= routes.HOST_ANSWERS_KEPT
