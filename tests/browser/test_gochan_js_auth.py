"""gochan.js with authorization on, in headless Chromium: the page is served
by gochan itself (same site), the stream authenticates with an HttpOnly
SameSite cookie, the update calls and publish() with a bearer token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.auth.tokens import SECRET, token

from .conftest import BrowserSession

SETUP = """async ({ topics }) => {
    const { Gochan } = await import("/gochan.js");
    window.tokenCalls = 0;
    const gc = new Gochan("", {
        token: async () => { window.tokenCalls += 1; return window.updateToken; },
    });
    window.gc = gc;
    window.got = [];
    window.sys = [];
    for (const type of ["open", "config", "error", "closed"]) {
        gc.addEventListener(type, (e) => sys.push([type, e.detail]));
    }
    for (const topic of topics) gc.subscribe(topic, (data, { topic }) => got.push([topic, data]));
    await gc.flush();
    return { clientId: gc.clientId, subscriptions: gc.subscriptions };
}"""


def test_same_site_cookie_for_the_stream_and_bearer_for_updates(
    browser: BrowserSession, gochan_server: Any, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(
        '<!doctype html><link rel="icon" href="data:,"><title>gochan auth</title>'
    )
    base, _ = gochan_server("--jwt-key", SECRET, "--static-dir", str(site))
    listen = ["news", "inbox.alice"]
    cookie_token = token("alice", subscribe=listen)
    bearer_token = token("alice", subscribe=listen, publish=["inbox.alice"])
    browser.context.add_cookies(
        [
            {
                "name": "gochan_token",
                "value": cookie_token,
                "url": base,
                "httpOnly": True,
                "sameSite": "Strict",
            }
        ]
    )
    page = browser.page
    requests: list[Any] = []
    page.on("request", lambda r: requests.append(r))
    page.goto(f"{base}/")
    assert browser.js("() => document.cookie") == ""  # HttpOnly: no script reads it
    browser.js(f"() => {{ window.updateToken = {bearer_token!r}; }}")

    state = browser.js(SETUP, {"topics": ["news"]})
    assert state["subscriptions"] == ["news"]
    streams = [r for r in requests if "/events" in r.url]
    assert len(streams) == 1
    stream_headers = streams[0].all_headers()
    assert stream_headers.get("cookie") == f"gochan_token={cookie_token}"
    assert "authorization" not in stream_headers

    # An update with the bearer token: one topic allowed, one refused.
    browser.js(
        "() => { gc.subscribe('inbox.alice', (d, { topic }) => got.push([topic, d]));"
        " gc.subscribe('inbox.bob', () => {}); }"
    )
    browser.js("() => gc.flush()")
    updates = [r for r in requests if r.url.endswith("/update_subscriptions")]
    assert len(updates) == 1
    assert updates[0].all_headers()["authorization"] == f"Bearer {bearer_token}"
    assert sorted(browser.js("() => gc.subscriptions")) == ["inbox.alice", "news"]
    errors = [detail for kind, detail in browser.js("() => sys") if kind == "error"]
    assert [(e["code"], e["topic"]) for e in errors] == [("forbidden", "inbox.bob")]

    # publish() with the same token: allowed on inbox.alice, 403 on news.
    event_id = browser.js("() => gc.publish('inbox.alice', 'hello me')")
    assert isinstance(event_id, str) and event_id
    browser.wait_js("() => got.length >= 1")
    assert browser.js("() => got") == [["inbox.alice", "hello me"]]
    status = browser.js("() => gc.publish('news', 'nope').then(() => 0, (e) => e.status)")
    assert status == 403
    assert browser.js("() => window.tokenCalls") >= 3  # asked before every call
    browser.assert_no_errors(allow="status of 403")
