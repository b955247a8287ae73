"""The 1000-topics page in headless Chromium: it connects, shows live
messages, changes subscriptions, and survives a server restart, with no
console error."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from .conftest import EXAMPLE_TOPICS, BrowserSession, ExampleServer, free_port

if TYPE_CHECKING:
    from playwright.sync_api import Request


def restart_noise(example: ExampleServer) -> str:
    """What Chromium logs by itself while the server is down, then has
    forgotten the client: failed loads of /events (the stream, gochan.js's
    HEAD probe), nothing else."""
    events = re.escape(f"({example.url}/events?id=")
    failure = r"net::ERR_CONNECTION_(REFUSED|RESET)|the server responded with a status of 401"
    return rf"^Failed to load resource: ({failure}).* {events}"


COUNTS = "() => gochanDemo.counts()"


def open_page(browser: BrowserSession, example: ExampleServer, topics: str) -> None:
    browser.page.goto(f"{example.url}/?topics={topics}&n={EXAMPLE_TOPICS}")
    browser.page.wait_for_selector('#status[data-state="live"]', timeout=10_000)


def wait_counts(browser: BrowserSession, minimum: dict[str, int], timeout: float = 10.0) -> None:
    """Wait until every topic in ``minimum`` has at least that many messages."""
    browser.wait_js(
        """(minimum) => {
            const counts = gochanDemo.counts();
            return Object.entries(minimum).every(([t, n]) => (counts[t] || 0) >= n);
        }""",
        minimum,
        timeout,
    )


def server_subscriptions(example: ExampleServer, client_id: str) -> list[str]:
    """The client's topics as the server has them (an empty update answers them)."""
    answer = httpx.post(
        f"{example.url}/update_subscriptions",
        json={"client_id": client_id, "add": [], "remove": []},
        timeout=5,
    )
    assert answer.status_code == 200, answer.text
    return sorted(answer.json()["subscriptions"])


def test_page_shows_live_messages(
    browser: BrowserSession, example: ExampleServer, artifacts: Path
) -> None:
    page = browser.page
    open_page(browser, example, "0-4")
    wait_counts(browser, {f"Topic{i}": 3 for i in range(5)})
    assert page.locator("#topic-rows tr").count() == 5
    client_id = browser.js("() => gochanDemo.gc.clientId")
    assert page.text_content("#client") == f"client {client_id}"
    assert server_subscriptions(example, client_id) == [f"Topic{i}" for i in range(5)]
    # Rates are computed on the page every 250 ms: 10 messages/s per topic.
    browser.wait_js("() => Number(document.getElementById('rate').textContent) > 0")
    browser.wait_js("() => /ms$/.test(document.getElementById('p50').textContent)")
    browser.wait_js("() => document.querySelector('tr[data-topic=Topic2] .count').textContent > 0")

    # A second handler on a topic gets the same messages, with ids, then leaves.
    got = browser.js(
        """() => new Promise((resolve) => {
            const got = [];
            const off = gochanDemo.gc.subscribe("Topic3", (data, { topic, id, event }) => {
                got.push({ data, topic, id, type: event.type });
                if (got.length === 3) { off(); resolve(got); }
            });
        })"""
    )
    assert [g["topic"] for g in got] == ["Topic3"] * 3
    assert [g["type"] for g in got] == ["Topic3"] * 3
    assert all(g["data"].startswith('{"payload":"Topic3 ') for g in got), got
    assert len({g["id"] for g in got}) == 3 and all(g["id"] for g in got)
    assert browser.js("() => gochanDemo.gc.topics.includes('Topic3')")  # the page's handler stays

    time.sleep(1.2)  # let the chart draw a few samples
    page.screenshot(path=str(artifacts / "1000topics.png"), full_page=True)
    browser.assert_no_errors()


def test_add_and_remove_topics_live(browser: BrowserSession, example: ExampleServer) -> None:
    page = browser.page
    open_page(browser, example, "0-4")
    wait_counts(browser, {"Topic0": 2, "Topic4": 2})
    client_id = browser.js("() => gochanDemo.gc.clientId")
    updates: list[Any] = []

    def on_request(request: Request) -> None:
        if request.method == "POST" and request.url.endswith("/update_subscriptions"):
            updates.append(request.post_data_json)

    page.on("request", on_request)

    # Three topics in one action: one request.
    page.fill("#topics-input", "10-12")
    page.press("#topics-input", "Enter")
    wait_counts(browser, {"Topic10": 2, "Topic11": 2, "Topic12": 2})
    assert updates == [
        {"client_id": client_id, "add": ["Topic10", "Topic11", "Topic12"], "remove": []}
    ]

    # Two removed in one action, one with its row's button.
    page.fill("#topics-input", "0, 1")
    page.click("#remove")
    browser.js("() => gochanDemo.gc.flush()")
    page.click('tr[data-topic="Topic2"] button')
    browser.js("() => gochanDemo.gc.flush()")
    assert updates[1:] == [
        {"client_id": client_id, "add": [], "remove": ["Topic0", "Topic1"]},
        {"client_id": client_id, "add": [], "remove": ["Topic2"]},
    ]
    assert page.locator('tr[data-topic="Topic0"]').count() == 0
    expected = ["Topic10", "Topic11", "Topic12", "Topic3", "Topic4"]
    assert sorted(browser.js("() => gochanDemo.gc.subscriptions")) == expected
    assert server_subscriptions(example, client_id) == expected

    # On the wire: nothing more for a removed topic, the others still flow.
    time.sleep(0.1)  # frames written before the update's answer may still be in flight
    wire = browser.js(
        """() => new Promise((resolve) => {
            const es = window.__sources[window.__sources.length - 1];
            const n = { Topic0: 0, Topic2: 0, Topic3: 0, Topic11: 0 };
            for (const t of Object.keys(n)) es.addEventListener(t, () => n[t]++);
            setTimeout(() => resolve(n), 800);
        })"""
    )
    assert wire["Topic0"] == 0 and wire["Topic2"] == 0, wire
    assert wire["Topic3"] >= 3 and wire["Topic11"] >= 3, wire
    assert browser.js("() => window.__sources.length") == 1  # one stream all along
    browser.assert_no_errors()


def test_survives_server_restart(browser: BrowserSession, example: ExampleServer) -> None:
    open_page(browser, example, "0-2")
    wait_counts(browser, {"Topic0": 3, "Topic1": 3, "Topic2": 3})
    first_id = browser.js("() => gochanDemo.gc.clientId")
    browser.js(
        """() => {
            window.__events = [];
            for (const type of ["closed", "disconnect", "reconnect", "config", "replay"]) {
                gochanDemo.gc.addEventListener(type, (e) => __events.push([type, e.detail]));
            }
        }"""
    )

    example.stop()  # streams get "Client closed"; the new server knows no client
    browser.page.wait_for_selector('#status[data-state="reconnecting"]', timeout=5_000)
    before = browser.js(COUNTS)
    time.sleep(0.3)
    example.start()

    wait_counts(browser, {t: n + 3 for t, n in before.items()}, timeout=20)
    events = browser.js("() => window.__events")
    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["closed", "disconnect"], events
    reconnect = next(detail for kind, detail in events if kind == "reconnect")
    new_id = browser.js("() => gochanDemo.gc.clientId")
    assert reconnect == {"clientId": new_id, "previousClientId": first_id, "sameClient": False}
    assert new_id != first_id
    # The new stream asked for replay after the last id it saw; this server
    # cannot know ids of the previous one and says so.
    replay = next((detail for kind, detail in events if kind == "replay"), None)
    assert replay is not None and replay["recovered"] is False, events
    expected = ["Topic0", "Topic1", "Topic2"]
    assert sorted(browser.js("() => gochanDemo.gc.subscriptions")) == expected
    assert server_subscriptions(example, new_id) == expected
    assert browser.page.get_attribute("#status", "data-state") == "live"
    # The counters are rendered twice a second, not per event.
    browser.wait_js("() => document.getElementById('reconnects').textContent !== '0'")
    assert browser.page.text_content("#reconnects") == "1"
    assert browser.js("() => gochanDemo.errors()")["stream"] == 1  # the drop, once
    browser.assert_no_errors(allow=restart_noise(example))


def test_page_controls_without_errors(browser: BrowserSession, example: ExampleServer) -> None:
    page = browser.page
    open_page(browser, example, "5")
    wait_counts(browser, {"Topic5": 2})
    page.click("#random")
    browser.js("() => gochanDemo.gc.flush()")
    assert page.locator("#topic-rows tr").count() == 11
    assert len(browser.js("() => gochanDemo.gc.subscriptions")) == 11
    # A topic gochan would refuse is refused on the page, before any request.
    page.fill("#topics-input", "message")
    page.press("#topics-input", "Enter")
    assert "reserved" in (page.text_content("#log li") or "")
    assert browser.js("() => gochanDemo.errors()") == {
        "topic": 1,
        "request": 0,
        "stream": 0,
        "total": 1,
    }
    assert page.text_content("#errors") == "1"
    page.click("#clear")
    browser.js("() => gochanDemo.gc.flush()")
    assert page.locator("#topic-rows tr").count() == 0
    assert browser.js("() => gochanDemo.gc.subscriptions") == []
    total = browser.js("() => gochanDemo.total()")
    time.sleep(0.4)
    assert browser.js("() => gochanDemo.total()") == total
    browser.assert_no_errors()


def test_errors_card_counts_every_refusal(browser: BrowserSession, example: ExampleServer) -> None:
    """A topic refused before any request, an update the server refuses, a
    lost stream: each is one more on the errors card, by kind."""
    page = browser.page
    open_page(browser, example, "0-2")
    wait_counts(browser, {"Topic0": 2})
    errors = "() => gochanDemo.errors()"
    assert browser.js(errors)["total"] == 0

    page.fill("#topics-input", "message")  # reserved: gochan.js refuses it
    page.press("#topics-input", "Enter")
    assert browser.js(errors) == {"topic": 1, "request": 0, "stream": 0, "total": 1}

    # 1,100 topics more than a client may hold (1,024 by default): the server
    # answers 400 to the whole update, and keeps the client as it was.
    page.fill("#topics-input", "100-1099 1100-1199")
    page.press("#topics-input", "Enter")
    browser.js("() => gochanDemo.gc.flush()")
    browser.wait_js("() => gochanDemo.errors().request === 1")
    assert "update-failed (HTTP 400)" in (page.text_content("#log li") or "")
    client_id = browser.js("() => gochanDemo.gc.clientId")
    assert server_subscriptions(example, client_id) == ["Topic0", "Topic1", "Topic2"]

    example.stop()  # the stream ends: one stream error, whatever the retries
    browser.wait_js("() => gochanDemo.errors().stream === 1")
    assert browser.js(errors) == {"topic": 1, "request": 1, "stream": 1, "total": 3}
    browser.wait_js("() => document.getElementById('errors').textContent === '3'")
    assert page.text_content("#error-kinds") == "topic 1 · req 1 · stream 1"
    url = re.escape(example.url)
    refused = rf"the server responded with a status of 400 .*{url}/update_subscriptions"
    down = rf"net::ERR_CONNECTION_(REFUSED|RESET) .*{url}/events"
    browser.assert_no_errors(allow=rf"^Failed to load resource: ({refused}|{down})")


def test_rates_follow_the_flags(browser: BrowserSession, tmp_path: Path) -> None:
    """--topics 20 --interval 0.05: each topic 20 messages/s, and the page
    reads 20.0 per topic and 4 x 20 in all, from what arrives."""
    server = ExampleServer(free_port(), tmp_path / "server.log", topics=20, interval=0.05)
    server.start()
    try:
        browser.page.goto(f"{server.url}/?topics=0-3&n=20")
        browser.wait_js("() => gochanDemo.total() >= 4 * 20 * 1.5", timeout=15)
        rates = browser.js("() => gochanDemo.rates()")
        assert sorted(rates) == ["Topic0", "Topic1", "Topic2", "Topic3"]
        assert all(15 <= r <= 25 for r in rates.values()), rates
        assert 60 <= browser.js("() => gochanDemo.rate()") <= 100
        on_screen = browser.page.text_content('tr[data-topic="Topic3"] .rate') or ""
        assert 15 <= float(on_screen) <= 25, on_screen
        # Topic20 is past --topics: subscribed, but nothing arrives for it.
        browser.js("() => gochanDemo.subscribe(['Topic20'])")
        browser.js("() => gochanDemo.gc.flush()")
        time.sleep(0.6)
        assert browser.js("() => gochanDemo.counts()")["Topic20"] == 0
        assert browser.js("() => gochanDemo.rates()")["Topic20"] == 0
        browser.assert_no_errors()
    finally:
        server.stop()


def test_rows_out_of_view_are_written_when_scrolled_to(
    browser: BrowserSession, example: ExampleServer
) -> None:
    """The page writes only the rows in view; one scrolled to shows its numbers."""
    page = browser.page
    open_page(browser, example, f"0-{EXAMPLE_TOPICS - 1}")
    last = f"Topic{EXAMPLE_TOPICS - 1}"
    wait_counts(browser, {last: 3})
    cell = f'tr[data-topic="{last}"] .count'
    assert page.text_content(cell) == "0"  # far below the fold, not written yet
    page.eval_on_selector("#topic-scroll", "(el) => { el.scrollTop = el.scrollHeight; }")
    browser.wait_js(
        "(cell) => Number(document.querySelector(cell).textContent) >= 3", cell, timeout=5
    )
    browser.assert_no_errors()
