"""The cluster example (examples/cluster/run.py) in headless Chromium: the
1000-topics page through nginx, round robin over three gochan nodes on one
NATS server (JetStream), and the node holding the browser's stream killed
with SIGKILL, twice: Chromium reconnects through nginx to another node with
the last event id and receives every message exactly once, on a topic given
at connect and on one added later from the page.

The example is started with the command its README gives, so this test is
also the proof that the README's command works.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import pytest

from gochan import Config
from gochan.client import Client
from gochan.server.routes import Router

from .conftest import ROOT, BrowserSession, free_port

if TYPE_CHECKING:
    from playwright.sync_api import Page, Response

EXAMPLE = ROOT / "examples" / "cluster"
README = EXAMPLE / "README.md"
TOPICS = 50  # the example's publisher: Topic0 ... Topic49
INTERVAL_S = 0.1  # each once per 0.1 s: 500 messages/s in all into JetStream
START_TIMEOUT_S = 60.0  # NATS, three nodes hearing each other, nginx
STOP_TIMEOUT_S = 30.0  # Ctrl-C to every process gone
FAILOVER_TIMEOUT_S = 20.0  # a kill to the stream open on another node
PUBLISH_EVERY_S = 0.02  # the test's own publisher: each probe topic 50 times a second
AT_CONNECT = "probe-connect"  # in the page's URL: subscribed when the stream opens
ADDED_LATER = "probe-later"  # added from the page's form, through nginx to any node
PROBES = (AT_CONNECT, ADDED_LATER)

# Every message of the probe topics as Chromium's EventSource delivered it,
# on whichever connection: [connection number, topic, event id, data].
PROBE_RECORDER = """
((probes) => {
  const Native = window.EventSource;
  window.__probes = [];
  window.__connections = 0;
  window.EventSource = class extends Native {
    constructor(url, init) {
      super(url, init);
      let connection = 0;
      // The browser reconnects the same object: each "open" is a new connection.
      this.addEventListener("open", () => { connection = ++window.__connections; });
      for (const topic of probes) {
        const record = (e) => window.__probes.push([connection, topic, e.lastEventId, e.data]);
        this.addEventListener(topic, record);
      }
    }
  };
})(%s);
"""


# -- the node header, without a cluster ----------------------------------------


async def test_a_cluster_node_names_itself_on_streams_and_update_answers() -> None:
    """X-Gochan-Node on a cluster node's streams and update answers (what
    the browser test below finds the stream's node by), none off cluster."""

    async def update(*args: Any) -> tuple[list[str], list[Any]]:
        return ["news"], []

    def router(cluster: Any) -> Router:
        streamer = SimpleNamespace(cluster=cluster, check_topics=list)
        return Router(streamer, Config(), lambda accept: (b"", ""))  # type: ignore[arg-type]

    node = SimpleNamespace(node_id="node-b", update=update)
    for cluster, expected in ((node, [(b"X-Gochan-Node", b"node-b")]), (None, [])):
        stream = router(cluster)._open_stream(Client("c1"), [], "", None)
        assert [h for h in stream.headers if h[0] == b"X-Gochan-Node"] == expected
    answer = await router(node)._update_in_cluster("c1", None, ["news"], [], [])
    assert answer.status == 200 and (b"X-Gochan-Node", b"node-b") in answer.headers
    assert orjson.loads(answer.body)["subscriptions"] == ["news"]


# -- the example, as its README runs it ---------------------------------------


def readme_command() -> list[str]:
    """The command of the README's block marked cluster-run, as argv."""
    text = README.read_text()
    match = re.search(r"<!-- cluster-run[^>]*-->\s*```sh\n(.*?)```", text, re.S)
    assert match, "examples/cluster/README.md: the block marked cluster-run is missing"
    (line,) = [ln for ln in match[1].splitlines() if ln.startswith("python")]
    argv = shlex.split(line)
    assert argv[:2] == ["python", "examples/cluster/run.py"], argv
    return [sys.executable, *argv[1:]]


def test_every_block_of_the_readme_is_run_here_or_illustrative() -> None:
    pattern = r"(?:<!-- ([\w-]+)[^>]*-->\s*)?^```(\w*)\n(.*?)^```"
    blocks = re.findall(pattern, README.read_text(), re.S | re.M)
    assert blocks
    for marker, _, body in blocks:
        assert marker in ("cluster-run", "illustrative"), body[:80]
    for target in re.findall(r"\]\(([^)\s#]+)\)", README.read_text()):
        assert (README.parent / target).exists(), target


def programs() -> None:
    """nats-server and nginx (Debian's packages), or a skip; CI must have them."""
    missing = [
        name
        for name, where in (("nats-server", "/usr/sbin/nats-server"), ("nginx", "/usr/sbin/nginx"))
        if not (shutil.which(name) or os.access(where, os.X_OK))
    ]
    if missing:
        if os.environ.get("GOCHAN_REQUIRE_BROKERS") == "1":
            pytest.fail(f"{' and '.join(missing)} required here (GOCHAN_REQUIRE_BROKERS=1)")
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install {' '.join(missing)})")


class ClusterExample:
    """examples/cluster/run.py, in a session of its own as in a terminal
    (a signal to its process group is a Ctrl-C; its programs run in
    sessions of their own, which it stops)."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.out = tmp_path / "run.out"
        argv = [*readme_command(), "--port", str(self.port), "--topics", str(TOPICS)]
        argv += ["--interval", str(INTERVAL_S), "--shutdown-retry-max", "2", "--keep"]
        env = {**os.environ, "TMPDIR": str(tmp_path)}  # its run directory, kept: logs
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while "cluster: open " not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the cluster example did not start:\n{self.text()}")
            time.sleep(0.1)
        banner = self.text()
        self.url = f"http://127.0.0.1:{self.port}"
        # "node-a  http://127.0.0.1:40123/ (pid 1234)"
        self.nodes = {
            node: (int(port), int(pid))
            for node, port, pid in re.findall(
                r"^(node-\w+)\s+http://127\.0\.0\.1:(\d+)/ \(pid (\d+)\)", banner, re.M
            )
        }
        assert len(self.nodes) == 3, banner
        found = re.search(r"JetStream; pid (\d+)", banner)
        assert found, banner
        self.nats_pid = int(found[1])
        logs = re.search(r"^logs in (\S+)", banner, re.M)
        assert logs, banner
        self.run_dir = Path(logs[1])
        self.nginx_pid = int((self.run_dir / "nginx.pid").read_text())

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def node_url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.nodes[node][0]}"

    def held_clients(self, node: str) -> int:
        """gochan_cluster_held_clients on the node's /metrics."""
        page = httpx.get(f"{self.node_url(node)}/metrics", timeout=5).text
        found = re.search(r"^gochan_cluster_held_clients(?:\{[^}]*\})? (\S+)$", page, re.M)
        assert found, page[:2000]
        return int(float(found[1]))

    def access_log(self) -> str:
        return (self.run_dir / "nginx-access.log").read_text(errors="replace")

    def logs(self) -> str:
        parts = [f"--- run.py\n{self.text()[-3000:]}"]
        for name in ("nginx-access.log", "nginx-error.log", "node-a.log", "node-b.log",
                     "node-c.log"):  # fmt: skip
            with contextlib.suppress(OSError):
                parts.append(f"--- {name}\n{(self.run_dir / name).read_text()[-3000:]}")
        return "\n".join(parts)

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the foreground process group, as a terminal sends it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(STOP_TIMEOUT_S)

    def kill(self) -> None:
        """The script and every program it printed, whatever state it is in."""
        children = getattr(self, "nodes", {})
        pids = [self.proc.pid, *(pid for _, pid in children.values())]
        pids += [getattr(self, "nats_pid", 0), getattr(self, "nginx_pid", 0)]
        for pid in filter(None, pids):
            if pid == self.proc.pid or self.ours(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        self.proc.wait(10)

    def ours(self, pid: int) -> bool:
        """``pid`` is still one of the example's programs (not a number
        reused since): its command line names the run directory (NATS,
        nginx) or the example's subject prefix (the nodes)."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
        run_dir = str(getattr(self, "run_dir", "\0"))
        return run_dir in argv or "cluster-example." in argv


@pytest.fixture
def cluster_example(tmp_path: Path, browser: BrowserSession) -> Iterator[ClusterExample]:
    programs()
    example = ClusterExample(tmp_path)
    try:
        yield example
    finally:
        if example.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                example.interrupt()
        example.kill()  # whatever is left in its group
        # Shown by pytest when the test failed: what each program said.
        print(f"{example.logs()}\n--- console errors\n{browser.console_errors}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child of the example that exited but was not reaped yet is a zombie.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return False


class Publisher(threading.Thread):
    """The test's own messages: {"seq": n} on each probe topic, n = 1, 2, ...,
    each published on the next live node in turn, straight to it: a publish
    reaches streams on every node. Not through nginx: nginx does not retry a
    POST it has sent, and one sent on a kept-alive connection to a node in
    the instant it dies is answered 502, stored or not (the README says so).
    ``retire(node)`` takes a node out of the turn before it is killed."""

    def __init__(self, example: ClusterExample) -> None:
        super().__init__(daemon=True)
        self.live = list(example.nodes)
        self.urls = {node: example.node_url(node) for node in example.nodes}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.sent = {topic: 0 for topic in PROBES}
        self.by_node = {node: 0 for node in example.nodes}
        self.failures: list[str] = []

    def retire(self, node: str) -> None:
        with self.lock:  # no publish to it is in flight once this returns
            self.live.remove(node)

    def run(self) -> None:
        turn = 0
        with httpx.Client(timeout=10) as http:
            while not self.stopping.is_set():
                for topic in PROBES:
                    with self.lock:
                        node = self.live[turn % len(self.live)]
                        turn += 1
                        seq = self.sent[topic] + 1
                        try:
                            answer = http.post(
                                f"{self.urls[node]}/publish?topic={topic}",
                                content=b'{"seq":%d}' % seq,
                            )
                        except httpx.HTTPError as exc:
                            self.failures.append(f"{topic} {seq} on {node}: {exc!r}")
                            return
                        if answer.status_code != 200:
                            self.failures.append(f"{topic} {seq} on {node}: {answer.text}")
                            return
                        self.sent[topic] = seq
                        self.by_node[node] += 1
                time.sleep(PUBLISH_EVERY_S)

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        assert not self.failures, self.failures


class Streams:
    """Every /events response the page received: its node (X-Gochan-Node),
    status, URL and request."""

    def __init__(self) -> None:
        self.seen: list[SimpleNamespace] = []

    def on_response(self, response: Response) -> None:
        if response.request.resource_type != "eventsource":
            return
        self.seen.append(
            SimpleNamespace(
                node=response.headers.get("x-gochan-node"),
                status=response.status,
                url=response.url,
                request=response.request,
            )
        )

    def wait_new(self, page: Page, after: int, timeout: float) -> SimpleNamespace:
        """The first stream opened (status 200) after the ``after`` first
        ones. Waited on in Playwright (its events arrive during its calls)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            opened = [s for s in self.seen[after:] if s.status == 200]
            if opened:
                return opened[0]
            page.wait_for_timeout(50)
        raise AssertionError(f"no new stream within {timeout}s: {self.seen}")


def update_through_page(browser: BrowserSession, action: str, topic: str) -> Any:
    """Type ``topic`` into the page's form and press Subscribe (``#add``) or
    Unsubscribe (``#remove``): the page's own update call, through nginx.
    Its answer (a Playwright Response)."""
    page = browser.page
    with page.expect_response(
        lambda r: r.url.endswith("/update_subscriptions"), timeout=10_000
    ) as answer:
        page.fill("#topics-input", topic)
        page.click(action)
    response = answer.value
    assert response.status == 200, response.text()
    return response


def received(browser: BrowserSession) -> dict[str, list[tuple[int, int, int]]]:
    """Per probe topic: (seq, event id, connection number) in arrival order."""
    out: dict[str, list[tuple[int, int, int]]] = {topic: [] for topic in PROBES}
    for stream, topic, event_id, data in browser.js("() => window.__probes"):
        out[topic].append((orjson.loads(data)["seq"], int(event_id), stream))
    return out


def wait_seq(browser: BrowserSession, wanted: dict[str, int], timeout: float) -> None:
    """Until each probe topic's last message has at least seq ``wanted``."""
    browser.wait_js(
        """(wanted) => Object.entries(wanted).every(([topic, seq]) =>
            window.__probes.some(([, t, , data]) => t === topic && JSON.parse(data).seq >= seq))""",
        wanted,
        timeout,
    )


# Chromium's own messages while a node dies: the cut stream, nothing else.
FAILOVER_NOISE = r"net::ERR_(INCOMPLETE_CHUNKED_ENCODING|CONNECTION_RESET|EMPTY_RESPONSE)"


@pytest.mark.timeout(150)  # START_TIMEOUT_S, two failovers, STOP_TIMEOUT_S
def test_killing_the_streams_node_loses_and_repeats_nothing(
    browser: BrowserSession, cluster_example: ClusterExample
) -> None:
    example = cluster_example
    page = browser.page
    streams = Streams()
    page.on("response", streams.on_response)
    page.add_init_script(PROBE_RECORDER % orjson.dumps(list(PROBES)).decode())
    page.goto(f"{example.url}/?n={TOPICS}&topics=0-9,{AT_CONNECT}")
    page.wait_for_selector('#status[data-state="live"]', timeout=15_000)
    browser.js("""() => {
        window.__replays = [];
        window.__reconnects = [];
        gochanDemo.gc.addEventListener("replay", (e) => window.__replays.push(e.detail));
        gochanDemo.gc.addEventListener("reconnect", (e) => window.__reconnects.push(e.detail));
    }""")  # fmt: skip
    client_id = browser.js("() => gochanDemo.gc.clientId")
    # The example's publisher reaches the page through nginx.
    browser.wait_js("() => ['Topic0', 'Topic9'].every((t) => gochanDemo.counts()[t] >= 3)")
    (first,) = streams.seen
    holder = first.node
    assert holder in example.nodes, streams.seen
    assert {n: example.held_clients(n) for n in example.nodes} == {
        n: int(n == holder) for n in example.nodes
    }

    # A topic added from the page: the update goes round robin to any node
    # and must be on the stream (held by another node) before its answer:
    # the publisher starts right after it. Until another node than the
    # holder answered one, it is removed and added again.
    answered_by: list[str] = []
    for _ in range(6):
        answer = update_through_page(browser, "#add", ADDED_LATER)
        assert ADDED_LATER in answer.json()["subscriptions"], answer.json()
        answered_by.append(answer.headers["x-gochan-node"])
        if answered_by[-1] != holder:
            break
        update_through_page(browser, "#remove", ADDED_LATER)
    assert answered_by[-1] != holder, f"every update answered by the holder: {answered_by}"

    publisher = Publisher(example)
    publisher.start()
    try:
        wait_seq(browser, {AT_CONNECT: 10, ADDED_LATER: 10}, timeout=10)
        killed: list[str] = []
        for _ in range(2):  # the first reconnect is gochan.js's, the second the browser's own
            before = len(streams.seen)
            publisher.retire(holder)
            last = received(browser)
            os.kill(example.nodes[holder][1], signal.SIGKILL)
            killed.append(holder)
            started = time.monotonic()
            stream = streams.wait_new(page, before, FAILOVER_TIMEOUT_S)
            failover_s = time.monotonic() - started
            sent_at_open = dict(publisher.sent)
            assert stream.node not in killed, (stream, killed)
            holder = stream.node
            # What was published between the last message the dead node
            # delivered and the new stream: the replay's share.
            missed = {t: sent_at_open[t] - (last[t][-1][0] if last[t] else 0) for t in PROBES}
            print(f"killed {killed[-1]}: stream on {holder} after {failover_s:.2f}s, "
                  f"published meanwhile {missed}")  # fmt: skip
            if len(killed) == 2:  # the browser waits its retry time (3 s): much to replay
                assert min(missed.values()) >= 10, missed
            browser.wait_js(f"() => window.__replays.length === {len(killed)}", timeout=10)
            sent = dict(publisher.sent)
            wait_seq(browser, {t: sent[t] + 10 for t in PROBES}, timeout=10)
        assert example.held_clients(holder) == 1
    finally:
        publisher.stop()
    sent = dict(publisher.sent)
    wait_seq(browser, sent, timeout=10)
    time.sleep(0.5)  # a duplicate would come now

    # Nothing lost, nothing twice, in order, on both topics, over three connections.
    got = received(browser)
    for topic in PROBES:
        seqs = [seq for seq, _, _ in got[topic]]
        assert seqs == list(range(1, sent[topic] + 1)), (topic, sent[topic], seqs)
        ids = [event_id for _, event_id, _ in got[topic]]
        assert ids == sorted(set(ids)), (topic, ids)
        assert {connection for _, _, connection in got[topic]} == {1, 2, 3}, topic
    counts = browser.js("() => gochanDemo.counts()")
    assert {t: counts[t] for t in PROBES} == sent
    # Each reconnect resumed from the last event id, as the same client.
    replays = browser.js("() => window.__replays")
    assert [r["recovered"] for r in replays] == [True, True], replays
    reconnects = browser.js("() => window.__reconnects")
    assert [r["clientId"] for r in reconnects] == [client_id, client_id], reconnects
    second, third = [s for s in streams.seen[1:] if s.status == 200]
    assert f"id={client_id}" in second.url and "last_event_id=" in second.url, second
    # The browser's own reconnect sent the header (newer than its URL's id,
    # which the header overrides), and nginx passed it on.
    header = third.request.all_headers().get("last-event-id")
    assert header and int(header) > int(second.url.rsplit("last_event_id=", 1)[1]), third.url
    # The page still counts the example's own messages.
    before = browser.js("() => gochanDemo.counts().Topic0")
    browser.wait_js(f"() => gochanDemo.counts().Topic0 >= {before + 3}", timeout=5)
    browser.assert_no_errors(allow=FAILOVER_NOISE)

    # Ctrl-C stops everything.
    pids = [example.nats_pid, example.nginx_pid, *(pid for _, pid in example.nodes.values())]
    assert example.interrupt() == 0, example.logs()
    assert "cluster: stopping (a signal)" in example.text()
    assert not [pid for pid in pids if alive(pid)]
