"""GET /metrics as a scraper sees it: a real server on a real port (and the
ASGI adapter under uvicorn), the page read by both of prometheus-client's
parsers, and values that move by what the test did."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as prometheus_families

import gochan
from gochan import Config, Streamer
from gochan._fast import LATENCY_BUCKETS_S, Histogram, pure
from gochan.asgi import GochanASGI
from gochan.server import Server
from tests.support import SSEStream, raw_request, running, wait_for
from tests.test_asgi import open_stream, serving

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Parser = Callable[[str], Iterable[Metric]]


async def scrape(base: str, openmetrics: bool = False) -> tuple[list[Metric], Samples]:
    """GET /metrics, checked and parsed with the parser its Content-Type calls for."""
    headers = {"Accept": OPENMETRICS} if openmetrics else {}
    async with httpx.AsyncClient() as http:
        r = await http.get(base + "/metrics", headers=headers)
    assert r.status_code == 200
    parser: Parser
    if openmetrics:
        assert r.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
        assert r.text.endswith("# EOF\n")
        parser = openmetrics_families
    else:
        assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "# EOF" not in r.text
        parser = prometheus_families
    families = list(parser(r.text))
    samples: Samples = {}
    for family in families:
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} twice"
            samples[key] = sample.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def check_families(families: list[Metric]) -> None:
    """Every family is typed and documented, and gochan's own are all there."""
    names = {f.name for f in families}
    assert len(names) == len(families), "a family appears twice"
    for family in families:
        assert family.type != "unknown", family.name
        assert family.documentation.strip(), f"{family.name} has no HELP"
    assert names & {"gochan_build", "gochan_build_info"}  # an info family, a gauge in 0.0.4
    for wanted in (
        "gochan_connections",
        "gochan_refusals",
        "gochan_message_fanout_seconds",
        "gochan_stream_duration_seconds",
        "gochan_driver_ready",
        "process_cpu_seconds",
        "python_info",
    ):
        assert wanted in names, wanted


def bucket_counts(samples: Samples, name: str) -> list[float]:
    """The cumulative bucket counts of a histogram, in the order of its bounds."""
    buckets = [
        (math.inf if dict(labels)["le"] == "+Inf" else float(dict(labels)["le"]), v)
        for (n, labels), v in samples.items()
        if n == name + "_bucket"
    ]
    return [v for _, v in sorted(buckets)]


def diff(after: Samples, before: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after[key] - before.get(key, 0.0)


async def test_raw_server_page_parses_both_ways_and_values_move() -> None:
    async with running() as server:
        base = f"http://127.0.0.1:{server.port}"
        for openmetrics in (False, True):
            families, before = await scrape(base, openmetrics)
            check_families(families)
        assert value(before, "gochan_build_info", version=gochan.__version__) == 1
        assert value(before, "gochan_driver_ready", driver="mem") == 1
        # Two streams on one topic, three messages: three observations of
        # the latency histogram (per message), six deliveries.
        streams = [await SSEStream.open(server.port, "/events?topic=m") for _ in range(2)]
        for stream in streams:
            await stream.config()
        async with httpx.AsyncClient() as http:
            for i in range(3):
                r = await http.post(base + "/publish?topic=m", content=f"x{i}".encode())
                assert r.status_code in (200, 202)
        for stream in streams:
            for i in range(3):
                assert (await stream.event())["data"] == f"x{i}"
        for openmetrics in (False, True):
            families, during = await scrape(base, openmetrics)
            check_families(families)
            assert value(during, "gochan_streams") == 2
            assert diff(during, before, "gochan_streams_opened_total") == 2
            assert diff(during, before, "gochan_clients_created_total") == 2
            assert diff(during, before, "gochan_messages_published_total") == 3
            assert diff(during, before, "gochan_messages_in_total") == 3
            assert diff(during, before, "gochan_deliveries_total") == 6
            assert diff(during, before, "gochan_written_bytes_total") > 0
            assert diff(during, before, "gochan_message_fanout_seconds_count") == 3
            assert value(during, "gochan_message_fanout_seconds_sum") > 0
            counts = bucket_counts(during, "gochan_message_fanout_seconds")
            assert len(counts) == len(LATENCY_BUCKETS_S) + 1
            assert counts == sorted(counts) and counts[-1] == 3
            # The two streams, the publishing client's and this scrape's connection.
            assert value(during, "gochan_connections") >= 3
            assert diff(during, before, "gochan_connections_accepted_total") >= 3
            assert diff(during, before, "gochan_stream_duration_seconds_count") == 0
        for stream in streams:
            await stream.close()
        await wait_for(lambda: server.streamer.hub.connection_count == 0)
        _, after = await scrape(base, openmetrics=True)
        assert value(after, "gochan_streams") == 0
        assert diff(after, before, "gochan_stream_duration_seconds_count") == 2
        assert value(after, "gochan_stream_duration_seconds_sum") > 0


async def test_refusals_by_reason() -> None:
    async with running(max_connections=1) as server:
        base = f"http://127.0.0.1:{server.port}"
        _, before = await scrape(base)
        assert not [k for k in before if k[0] == "gochan_refusals_total"]
        await wait_for(lambda: server.connections == 0)  # the scrape's connection
        answer = await raw_request(server.port, b"NOT HTTP AT ALL\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400")
        await wait_for(lambda: server.connections == 0)
        stream = await SSEStream.open(server.port, "/events")
        await stream.config()
        answer = await raw_request(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503")
        await stream.close()
        await wait_for(lambda: server.connections == 0)
        for openmetrics in (False, True):
            _, after = await scrape(base, openmetrics)
            await wait_for(lambda: server.connections == 0)
            assert value(after, "gochan_refusals_total", reason="bad_request") == 1
            assert value(after, "gochan_refusals_total", reason="max_connections") == 1
            assert value(after, "gochan_bad_requests_total") == 1
            assert value(after, "gochan_connections_refused_total") == 1
        server.metrics.refuse("forbidden")  # the API other checks count with
        _, after = await scrape(base)
        assert value(after, "gochan_refusals_total", reason="forbidden") == 1


async def test_asgi_adapter_page_parses_both_ways_and_values_move() -> None:
    streamer = Streamer(Config(max_connections=2))
    realtime = GochanASGI(streamer, publish_key_required=False)
    async with serving(realtime) as served:
        for openmetrics in (False, True):
            families, before = await scrape(served.base, openmetrics)
            check_families(families)
        stream = await open_stream(served, "/events?topic=a")
        await stream.config()
        await streamer.publish("a", b"1")
        assert (await stream.event())["data"] == "1"
        # The stream and this scrape hold the two requests allowed: one more is refused.
        async with httpx.AsyncClient() as http:
            blocker = await open_stream(served, "/events")
            r = await http.get(served.base + "/healthz")
            assert r.status_code == 503
            await blocker.close()
            await wait_for(lambda: realtime.metrics.connections == 1)
        for openmetrics in (False, True):
            families, after = await scrape(served.base, openmetrics)
            check_families(families)
            assert value(after, "gochan_streams") == 1
            assert diff(after, before, "gochan_streams_opened_total") == 2
            assert diff(after, before, "gochan_messages_in_total") == 1
            assert diff(after, before, "gochan_message_fanout_seconds_count") == 1
            assert diff(after, before, "gochan_stream_duration_seconds_count") == 1
            assert value(after, "gochan_refusals_total", reason="max_connections") == 1
            assert value(after, "gochan_connections") == 2  # the stream and this scrape
        realtime.end_streams()
        await stream.close()


async def test_front_ends_keep_their_own_registries() -> None:
    # Two streamers each with a server, and a second front end on one of
    # them: every page builds, and what one front end counts is its own.
    async with running() as one, running() as two:
        asgi = GochanASGI(one.streamer)
        extra = Server(one.streamer, one.config, sweep=False)  # not listening
        assert len({id(m.registry) for m in (one.metrics, two.metrics, asgi.metrics)}) == 3
        answer = await raw_request(one.port, b"BAD\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400")
        _, first = await scrape(f"http://127.0.0.1:{one.port}")
        _, second = await scrape(f"http://127.0.0.1:{two.port}")
        assert value(first, "gochan_refusals_total", reason="bad_request") == 1
        assert ("gochan_refusals_total", frozenset({("reason", "bad_request")})) not in second
        for page in (asgi.metrics.render(), extra.metrics.render()):
            assert 'gochan_refusals_total{reason="bad_request"}' not in page
            list(prometheus_families(page))


async def test_page_before_the_streamer_starts() -> None:
    streamer = Streamer()
    realtime = GochanASGI(streamer)
    body, content_type = realtime.metrics.exposition(OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(body.decode())}
    assert families["gochan_message_fanout_seconds"].samples[-1].value == 0
    (ready,) = families["gochan_driver_ready"].samples
    assert (ready.labels, ready.value) == ({"driver": "mem"}, 0)
    await asyncio.sleep(0)


# -- the histogram the fan-out core keeps ---------------------------------

BOUNDS = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=32, unique=True
).map(sorted)


@given(BOUNDS, st.lists(st.floats(min_value=-2e6, max_value=2e6, allow_nan=False), max_size=200))
def test_histogram_counts_as_a_bisect_on_its_bounds(
    bounds: list[float], values: list[float]
) -> None:
    compiled, oracle = Histogram(bounds), pure.Histogram(bounds)
    for v in values:
        compiled.record(v)
        oracle.record(v)
    got, want = compiled.snapshot(), oracle.snapshot()
    assert got[:2] == want[:2]
    assert got[2] == pytest.approx(want[2])
    assert compiled.count == len(values) == got[1][-1]


@pytest.mark.parametrize(
    "bounds", [(), (1.0, 1.0), (2.0, 1.0), (1.0, math.inf), (math.nan,), tuple(range(33))]
)
def test_histogram_refuses_bad_bounds(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="bound"):
        Histogram(bounds)


def test_process_figures_match_proc() -> None:
    import os
    import resource

    from gochan.server.metrics import ProcessCollector

    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(50)]
    try:
        figures = {f.name: f.samples[0].value for f in ProcessCollector().collect()}
        listed = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own descriptor
    finally:
        for fd in held:
            os.close(fd)
    # Linux 6.2+ gives the count as the directory's size; before, the listing
    # gochan falls back to holds a descriptor of its own.
    assert listed <= figures["process_open_fds"] <= listed + 1
    assert figures["process_max_fds"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert figures["process_resident_memory_bytes"] > 0
    assert figures["process_cpu_seconds"] > 0
    assert ProcessCollector("/nonexistent").boot_time == 0.0
    assert list(ProcessCollector("/nonexistent").collect()) == []
