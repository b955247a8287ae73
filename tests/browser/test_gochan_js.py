"""gochan.js itself in headless Chromium: a gochan on another origin with
cookies and a bearer token, awkward topic names and bodies, and reconnection
as the same client when the connection drops but the server stays."""

from __future__ import annotations

from typing import Any

import httpx

from .conftest import BrowserSession, ExampleServer

# Topics that are also names EventSource gives its own events, and topics that
# need escaping in a URL.
TOPICS = ["error", "open", "naïve topic ☃", "a/b?c=d&e#f"]

SETUP = """async ({ base, topics }) => {
    const { Gochan } = await import(`${base}/gochan.js`);
    const gc = new Gochan(base, {
        withCredentials: true,
        headers: async () => ({ Authorization: "Bearer s3cret" }),
    });
    window.gc = gc;
    window.got = [];
    window.sys = [];
    const types = ["open", "config", "reconnect", "disconnect", "error", "replay", "closed"];
    for (const type of types) gc.addEventListener(type, (e) => sys.push([type, e.detail]));
    for (const topic of topics) {
        gc.subscribe(topic, (data, { topic, id }) => got.push({ topic, data, id }));
    }
    await gc.flush();
    return { clientId: gc.clientId, subscriptions: gc.subscriptions };
}"""


def publish(base: str, topic: str, data: str) -> str:
    answer = httpx.post(f"{base}/publish", json={"topic": topic, "data": data}, timeout=5)
    assert answer.status_code == 200, answer.text
    event_id: str = answer.json()["id"]
    return event_id


def received(browser: BrowserSession, count: int) -> list[dict[str, Any]]:
    browser.wait_js("(n) => window.got.length >= n", count)
    got: list[dict[str, Any]] = browser.js("() => window.got")
    return got


def test_cross_origin_token_cookie_and_awkward_topics(
    browser: BrowserSession, example: ExampleServer, gochan_server: Any
) -> None:
    """The page is on one origin, gochan on another that allows it."""
    base, _ = gochan_server("--cors-origins", example.url)
    page = browser.page
    browser.context.add_cookies([{"name": "session", "value": "c00kie", "url": base}])
    requests: list[Any] = []
    page.on("request", lambda r: requests.append(r) if r.url.startswith(base) else None)
    page.goto(f"{example.url}/?topics=1")

    state = browser.js(SETUP, {"base": base, "topics": TOPICS})
    assert sorted(state["subscriptions"]) == sorted(TOPICS)
    # The first stream carried the topics: no update call was needed.
    streams = [r for r in requests if r.url.startswith(f"{base}/events")]
    assert len(streams) == 1
    assert all(f"topic={t}" in httpx.URL(streams[0].url).query.decode() for t in ["error", "open"])
    assert streams[0].all_headers().get("cookie") == "session=c00kie"

    bodies = {
        "error": "one\r\ntwo\rthree\nfour",
        "open": "",
        "naïve topic ☃": "héllo ☃ 🎉",
        "a/b?c=d&e#f": '{"json": [1, 2]}\n\n',
    }
    ids = {topic: publish(base, topic, data) for topic, data in bodies.items()}
    got = received(browser, len(bodies))
    assert sorted(got, key=lambda g: g["topic"]) == sorted(
        [
            {"topic": "error", "data": "one\ntwo\nthree\nfour", "id": ids["error"]},
            {"topic": "open", "data": "", "id": ids["open"]},
            {"topic": "naïve topic ☃", "data": "héllo ☃ 🎉", "id": ids["naïve topic ☃"]},
            {"topic": "a/b?c=d&e#f", "data": '{"json": [1, 2]}\n\n', "id": ids["a/b?c=d&e#f"]},
        ],
        key=lambda g: g["topic"],
    )
    assert browser.js("() => gc.lastEventId") == got[-1]["id"]

    # A later change is an update call with the token and the cookie.
    browser.js("() => { gc.subscribe('late', () => {}); gc.unsubscribe('open'); }")
    browser.js("() => gc.flush()")
    updates = [r for r in requests if r.method == "POST"]
    assert len(updates) == 1
    assert updates[0].post_data_json == {
        "client_id": state["clientId"],
        "add": ["late"],
        "remove": ["open"],
    }
    headers = updates[0].all_headers()
    assert headers["authorization"] == "Bearer s3cret"
    assert headers["cookie"] == "session=c00kie"
    assert sorted(browser.js("() => gc.subscriptions")) == sorted(
        ["error", "naïve topic ☃", "a/b?c=d&e#f", "late"]
    )
    # EventSource's own "open"/"error" events never reached the topic handlers,
    # and topic frames named "error" were not taken for failures.
    kinds = [kind for kind, _ in browser.js("() => window.sys")]
    assert kinds == ["open", "config"], kinds
    browser.assert_no_errors()


def test_reconnects_as_the_same_client_after_a_drop(
    browser: BrowserSession, example: ExampleServer, gochan_server: Any, tcp_proxy: Any
) -> None:
    """The connection drops, the server keeps the client: the next stream is
    the same client, with its topics (no update call needed), and what was
    published meanwhile is replayed, once."""
    base, _ = gochan_server("--cors-origins", example.url, "--retry-ms", "300")
    proxy = tcp_proxy(int(base.rsplit(":", 1)[1]))
    page = browser.page
    updates: list[Any] = []
    page.on("request", lambda r: updates.append(r) if r.method == "POST" else None)
    page.goto(f"{example.url}/?topics=1")
    state = browser.js(SETUP, {"base": proxy.url, "topics": ["news"]})
    client_id = state["clientId"]
    first = publish(base, "news", "m1")
    assert received(browser, 1)[0]["id"] == first

    # 1. The first stream's URL has no client id: gochan.js opens the next one
    #    itself, as this client, resuming after the last id it saw.
    proxy.cut()
    gap1 = publish(base, "news", "while away 1")
    browser.wait_js("() => sys.filter(([t]) => t === 'reconnect').length === 1")
    urls = browser.js("() => window.__sources.map((es) => es.url)")
    assert len(urls) == 3  # the page's own stream, then gochan.js's first and second
    query = httpx.URL(urls[2]).params
    assert query.get("id") == client_id and query.get("last_event_id") == first
    assert "topic" not in query
    second = publish(base, "news", "m2")
    assert received(browser, 3)[-1]["id"] == second

    # 2. Now the browser reconnects the same EventSource by itself.
    proxy.cut()
    gap2 = publish(base, "news", "while away 2")
    browser.wait_js("() => sys.filter(([t]) => t === 'reconnect').length === 2")
    assert browser.js("() => window.__sources.length") == 3
    third = publish(base, "news", "m3")
    got = received(browser, 5)
    assert [g["id"] for g in got] == [first, gap1, second, gap2, third]
    assert [g["data"] for g in got] == ["m1", "while away 1", "m2", "while away 2", "m3"]

    events = browser.js("() => window.sys")
    reconnects = [detail for kind, detail in events if kind == "reconnect"]
    same = {"clientId": client_id, "previousClientId": client_id, "sameClient": True}
    assert reconnects == [same, same]
    replays = [detail for kind, detail in events if kind == "replay"]
    assert replays == [
        {"lastEventId": first, "recovered": True},  # from ?last_event_id=
        {"lastEventId": second, "recovered": True},  # from the browser's Last-Event-ID
    ]
    assert [kind for kind, _ in events].count("disconnect") == 2
    assert browser.js("() => gc.subscriptions") == ["news"]
    assert updates == []  # the server kept the topics: nothing to re-apply
    assert proxy.accepted >= 3
    browser.assert_no_errors()


# Every event of the page's gochan.js, with when it came (performance.now()).
TIMED_SETUP = """async ({ topic }) => {
    const { Gochan } = await import("/gochan.js");
    const gc = new Gochan();
    window.gc = gc;
    window.got = [];
    window.sys = [];
    const types = ["open", "config", "reconnect", "disconnect", "error", "replay", "closed"];
    for (const type of types) {
        gc.addEventListener(type, (e) => sys.push([type, e.detail, performance.now()]));
    }
    gc.subscribe(topic, (data, { id }) => got.push({ data, id }));
    await gc.flush();
    return gc.clientId;
}"""
SHUTDOWN_RETRY_S = 2.0
EARLIEST_S = 1.5  # lenient: the delay is 2 s, timers and start-up vary


def test_a_server_shutdown_delays_the_reconnect_by_the_servers_retry(
    browser: BrowserSession, gochan_server: Any
) -> None:
    """SIGTERM ends the page's first stream (opened without a client id) with
    a shutdown delay of 2 s; a new server is up on the same port well before
    that. gochan.js opens no stream before the delay has passed (it used to
    reopen at once), then opens one and comes back as a new client of the new
    server, with its topic."""
    window = str(SHUTDOWN_RETRY_S)
    flags = ("--shutdown-retry-min", window, "--shutdown-retry-max", window)
    base, old = gochan_server(*flags)
    browser.page.goto(f"{base}/healthz")  # a page of gochan's origin: no CORS
    client_id = browser.js(TIMED_SETUP, {"topic": "news"})
    first = publish(base, "news", "before")
    assert received(browser, 1)[0]["id"] == first
    assert browser.js("() => window.__sources.length") == 1

    old.stop()  # SIGTERM: the stream ends with the shutdown frame, Client closed
    gochan_server(*flags, port=int(base.rsplit(":", 1)[1]))  # up again, same port
    browser.wait_js(
        "() => sys.filter(([t]) => t === 'reconnect').length === 1", timeout=SHUTDOWN_RETRY_S + 20
    )
    second = publish(base, "news", "after")
    got = received(browser, 2)
    assert [g["data"] for g in got] == ["before", "after"] and got[1]["id"] == second

    events = browser.js("() => sys.map(([t, d, at]) => [t, d, at])")
    sources = browser.js("() => window.__sources.map((es) => [es.url, es.createdAt])")
    closed = [(detail, at) for kind, detail, at in events if kind == "closed"]
    assert len(closed) == 1, events
    closed_at = closed[0][1]
    # The streams gochan.js opened after the end: none before the delay.
    after = sources[1:]
    assert after, sources
    waited = [(at - closed_at) / 1000 for _, at in after]
    assert min(waited) >= EARLIEST_S, waited
    assert closed[0][0] == {"retryMs": int(SHUTDOWN_RETRY_S * 1000)}
    # The first of them came back as the old client; the new server did not
    # know it (401), so the next was a new client with the page's topic.
    assert httpx.URL(after[0][0]).params.get("id") == client_id
    fresh = httpx.URL(after[-1][0]).params
    assert fresh.get("id") is None and fresh.get_list("topic") == ["news"]
    reconnect = next(detail for kind, detail, _ in events if kind == "reconnect")
    assert reconnect["previousClientId"] == client_id and reconnect["sameClient"] is False
    print(f"streams opened {', '.join(f'{w:.2f}' for w in waited)} s after Client closed")
    browser.assert_no_errors(allow="401|ERR_CONNECTION_REFUSED|favicon.ico")
