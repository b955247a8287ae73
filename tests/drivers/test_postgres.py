"""PostgresDriver against a real PostgreSQL (see _postgres_server for which one).

Every test uses a random channel prefix of its own, so tests on a shared
server see neither each other's notifications nor anyone else's.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest

from gochan.drivers.postgres import MAX_PAYLOAD_BYTES, PayloadError, PostgresDriver, quote_channel
from gochan.errors import (
    ConfigurationError,
    InvalidTopicError,
    LimitExceededError,
)

from . import _postgres_server, e2e, harness
from ._postgres_server import Postgres
from .conftest import free_port
from .harness import DELIVERY_TIMEOUT_S, Recorder, wait_until

PROMPT_S = 1.0  # "promptly": how long a refusal while disconnected may take


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    server = _postgres_server.obtain()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"gt{secrets.token_hex(3)}_"  # 9 bytes: 54 left for the topic


def connected(
    dsn: str, prefix: str, **options: Any
) -> AbstractAsyncContextManager[tuple[PostgresDriver, Recorder]]:
    return harness.connected(PostgresDriver(dsn=dsn, prefix=prefix, **options))


@asynccontextmanager
async def plain_connection(dsn: str) -> AsyncIterator[Any]:
    """An ordinary client session, as any other application would use."""
    conn = await asyncpg.connect(dsn, timeout=DELIVERY_TIMEOUT_S)
    try:
        yield conn
    finally:
        await conn.close()


async def notify(dsn: str, channel: str, *payloads: str) -> None:
    async with plain_connection(dsn) as conn:
        for payload in payloads:
            await conn.execute("SELECT pg_notify($1, $2)", channel, payload)


# -- no server needed ---------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["orders", "Mixed Case", 'with "quotes"', "a'b", "x; DROP TABLE t; --", "é" * 28, "x" * 56],
)
def test_mappable_topics(topic: str) -> None:
    PostgresDriver().check_topic(topic)  # no connection, no I/O


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("x" * 57, "longer than 56 bytes"),
        ("é" * 29, "longer than 56 bytes"),
        ("", "empty"),
        ("a\nb", "control"),
        ("a\x00b", "control"),
    ],
)
def test_unmappable_topics_are_refused(topic: str, reason: str) -> None:
    with pytest.raises(InvalidTopicError) as info:
        PostgresDriver().check_topic(topic)
    assert info.value.topic == topic
    assert reason in info.value.reason
    assert isinstance(info.value, ValueError)


def test_channel_names() -> None:
    assert PostgresDriver().channel("orders") == "gochan_orders"
    assert PostgresDriver(prefix="").channel("x" * 63) == "x" * 63
    with pytest.raises(InvalidTopicError):
        PostgresDriver(prefix="").check_topic("x" * 64)
    assert quote_channel('a"b') == '"a""b"'


def test_payload_rules() -> None:
    driver = PostgresDriver()
    assert driver.check_payload("héllo\n".encode()) == "héllo\n"
    assert driver.check_payload(b"x" * MAX_PAYLOAD_BYTES) == "x" * MAX_PAYLOAD_BYTES
    with pytest.raises(LimitExceededError):
        driver.check_payload(b"x" * (MAX_PAYLOAD_BYTES + 1))
    for binary in (b"\xff\xfe", b"a\x00b", "é".encode()[:1]):
        with pytest.raises(PayloadError) as info:
            driver.check_payload(binary)
        assert isinstance(info.value, ValueError)


def test_bad_configuration_is_refused() -> None:
    for kwargs in ({"prefix": "p" * 63}, {"prefix": "a\x00"}, {"pool_size": 0}, {"timeout": 0}):
        with pytest.raises(ConfigurationError):
            PostgresDriver(**kwargs)


def test_registry_builds_the_driver() -> None:
    options = {"dsn": "postgresql://u@h/db", "prefix": "p_"}
    harness.check_registry("postgres", options, PostgresDriver)


async def test_connect_to_nothing_fails_promptly() -> None:
    driver = PostgresDriver(dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/x", timeout=2)
    await harness.check_connect_to_nothing(driver, 5.0)


# -- against the server -----------------------------------------------------------


async def test_plain_notify_arrives_unchanged(postgres: Postgres, prefix: str) -> None:
    text = "line 1\r\nline 2\n\rdata: x — ünïcode ✓ " + "y" * 7000
    topics = ["orders", "Mixed Case", 'with "quotes"', "a'b;--"]

    async with connected(postgres.dsn, prefix) as (driver, rec):
        for topic in topics:
            await driver.subscribe(topic)
        await notify(postgres.dsn, prefix + "orders", text, "", "second")
        async with plain_connection(postgres.dsn) as conn:
            # NOTIFY with the channel quoted as an identifier, as documented.
            for topic in topics[1:]:
                await conn.execute(f"NOTIFY {quote_channel(prefix + topic)}, 'via NOTIFY'")
            await conn.execute(f"NOTIFY {prefix}mixed, 'folded: not ours'")
        await rec.wait_body("orders", b"second")
        for topic in topics[1:]:
            await rec.wait_body(topic, b"via NOTIFY")
        assert rec.bodies("orders") == [text.encode(), b"", b"second"]
        assert all(event_id is None for _, _, event_id in rec.messages)
        assert rec.failures == []
        assert driver.stats()["subscriptions"] == len(topics)


async def test_driver_publish_reaches_every_process(postgres: Postgres, prefix: str) -> None:
    """Two processes holding a topic both get every message: fan-out."""

    async with (
        connected(postgres.dsn, prefix) as (one, rec1),
        connected(postgres.dsn, prefix) as (two, rec2),
        connected(postgres.dsn, prefix) as (three, rec3),
    ):
        assert one.backend_pid != two.backend_pid
        sent = [f"message {i} é".encode() for i in range(50)]
        await harness.check_fan_out((one, rec1), (two, rec2), (three, rec3), sent)
        assert three.stats()["stray"] == 0


async def test_subscribe_and_unsubscribe_listen_and_unlisten(
    postgres: Postgres, prefix: str
) -> None:
    async with connected(postgres.dsn, prefix) as (driver, rec):
        await notify(postgres.dsn, prefix + "t", "before")
        await driver.subscribe("t")
        await driver.subscribe("sentinel")
        await notify(postgres.dsn, prefix + "t", "listening")
        await rec.wait_body("t", b"listening")

        await driver.unsubscribe("t")
        assert driver.topics == {"sentinel"}
        # One session, two transactions in order: had "after" been sent to
        # the driver's session, it would have arrived before the sentinel.
        await notify(postgres.dsn, prefix + "t", "after")
        await notify(postgres.dsn, prefix + "sentinel", "1")
        await rec.wait_body("sentinel", b"1")
        assert rec.bodies("t") == [b"listening"]
        # Not merely filtered out by the driver: the session got nothing (UNLISTEN).
        assert driver.stats()["stray"] == 0

        await driver.unsubscribe("t")  # twice: harmless
        await driver.subscribe("t")
        await notify(postgres.dsn, prefix + "t", "again")
        await rec.wait_body("t", b"again")
        assert rec.bodies("t") == [b"listening", b"again"]


async def test_unsendable_payloads_are_refused_before_the_server(
    postgres: Postgres, prefix: str
) -> None:
    async with connected(postgres.dsn, prefix) as (driver, rec):
        await driver.subscribe("t")
        with pytest.raises(PayloadError):
            await driver.publish("t", b"\x89PNG\r\n\x1a\n\x00")
        with pytest.raises(LimitExceededError):
            await driver.publish("t", b"x" * (MAX_PAYLOAD_BYTES + 1))
        with pytest.raises(InvalidTopicError):
            await driver.subscribe("x" * 60)
        with pytest.raises(InvalidTopicError):
            await driver.publish("x" * 60, b"x")
        biggest = b"z" * MAX_PAYLOAD_BYTES  # the limit is right: this one goes
        await driver.publish("t", biggest)
        await rec.wait_body("t", biggest)
        assert rec.bodies("t") == [biggest]
        assert driver.stats()["reconnects"] == 0


async def test_close_is_idempotent_and_leaves_no_session(postgres: Postgres, prefix: str) -> None:
    app = f"gochan-test-{secrets.token_hex(4)}"

    async def sessions(conn: Any) -> int:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app
            )
        )

    async with plain_connection(postgres.dsn) as conn:
        driver = PostgresDriver(dsn=postgres.dsn, prefix=prefix, application_name=app)
        await driver.connect(Recorder())
        await driver.subscribe("t")
        await driver.publish("t", b"x")
        assert await sessions(conn) >= 2  # the listener and a publisher
        await driver.close()
        await driver.close()
        assert not driver.ready
        for _ in range(100):
            if await sessions(conn) == 0:
                break
            await asyncio.sleep(0.05)
        assert await sessions(conn) == 0
        await harness.check_closed(driver, "t")


async def test_terminated_backend_is_replaced(postgres: Postgres, prefix: str) -> None:
    async with connected(postgres.dsn, prefix, reconnect_min=0.05) as (driver, rec):
        topics = [f"room {i}" for i in range(20)]
        for topic in topics:
            await driver.subscribe(topic)
        old_pid = driver.backend_pid
        async with plain_connection(postgres.dsn) as conn:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", old_pid)
        await wait_until(lambda: driver.stats()["reconnects"] == 1 and driver.ready, 10, "relisten")
        assert driver.backend_pid not in (None, old_pid)
        assert driver.topics == set(topics)
        for topic in topics:
            await notify(postgres.dsn, prefix + topic, topic)
        for topic in topics:
            await rec.wait_body(topic, topic.encode())
        assert rec.failures == []
        await driver.publish("room 1", b"published after")  # the pool still works
        await rec.wait_body("room 1", b"published after")


async def test_outage_then_recovery(postgres: Postgres, prefix: str) -> None:
    """The server drops the driver and refuses it for a while (its role may
    not log in), then lets it back."""
    parts = urlsplit(postgres.dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        pytest.skip("needs a URI DSN to log in as a role of the test's own")
    role = f"gochan_test_{secrets.token_hex(4)}"
    netloc = f"{role}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    dsn = urlunsplit(parts._replace(netloc=netloc))

    async def body() -> None:
        async with plain_connection(postgres.dsn) as admin:
            try:
                await admin.execute(f'CREATE ROLE "{role}" LOGIN')
            except asyncpg.PostgresError as exc:
                pytest.skip(f"cannot create a role here: {exc}")
            try:
                await outage(admin)
            finally:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                    role,
                )
                await admin.execute(f'DROP ROLE IF EXISTS "{role}"')

    async def outage(admin: Any) -> None:
        async with connected(
            dsn, prefix, reconnect_min=0.05, reconnect_max=0.3, ping_interval=0.5
        ) as (driver, rec):
            for topic in ("kept 1", "kept 2", "dropped"):
                await driver.subscribe(topic)
            await admin.execute(f'ALTER ROLE "{role}" NOLOGIN')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
            )
            await wait_until(lambda: not driver.ready, 5, "ready to turn False")
            await harness.check_refused_while_down(driver, "new", "kept 1", PROMPT_S)
            await driver.unsubscribe("dropped")  # forgotten locally
            await asyncio.sleep(1.0)  # failed reconnection attempts and pings
            assert not driver.ready
            assert driver.stats()["reconnects"] == 0

            await admin.execute(f'ALTER ROLE "{role}" LOGIN')
            await wait_until(lambda: driver.ready, 10, "reconnection")
            assert driver.stats()["reconnects"] == 1
            assert driver.topics == {"kept 1", "kept 2"}
            await notify(postgres.dsn, prefix + "dropped", "no")
            await notify(postgres.dsn, prefix + "kept 1", "one")
            await notify(postgres.dsn, prefix + "kept 2", "two")
            await rec.wait_body("kept 1", b"one")
            await rec.wait_body("kept 2", b"two")
            assert rec.bodies("dropped") == []
            assert driver.stats()["stray"] == 0  # "dropped" was not LISTENed again
            assert rec.failures == []  # a connection failure is no topic's failure
            await driver.subscribe("new")  # and it works as before
            await driver.publish("new", b"fresh")
            await rec.wait_body("new", b"fresh")
            await asyncio.sleep(1.2)  # pings on a healthy connection change nothing
            assert driver.ready and driver.stats()["reconnects"] == 1

    await body()


# -- end to end, through gochan's HTTP surface (tests/drivers/e2e.py) -------------


def e2e_broker(postgres: Postgres, prefix: str) -> e2e.Broker:
    app = f"gochan-e2e-{secrets.token_hex(4)}"

    async def publish(topic: str, data: bytes) -> None:
        await notify(postgres.dsn, prefix + topic, data.decode())

    async def restart() -> None:
        """Every connection of the nodes dropped by the server, as a restart would."""
        async with plain_connection(postgres.dsn) as conn:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = $1",
                app,
            )

    options = {
        "dsn": postgres.dsn,
        "prefix": prefix,
        "application_name": app,
        "reconnect_min": 0.05,
        "reconnect_max": 0.5,
    }
    # LISTENs are private to their session: no probe from the server's side.
    return e2e.Broker("postgres", options, publish, restart, None)


async def test_e2e_relay(postgres: Postgres, prefix: str) -> None:
    await e2e.check_relay(e2e_broker(postgres, prefix))


async def test_e2e_subscription_lifecycle(postgres: Postgres, prefix: str) -> None:
    await e2e.check_subscription_lifecycle(e2e_broker(postgres, prefix))


async def test_e2e_replay_on_the_same_node(postgres: Postgres, prefix: str) -> None:
    await e2e.check_replay_on_the_same_node(e2e_broker(postgres, prefix))


async def test_e2e_broker_restart(postgres: Postgres, prefix: str) -> None:
    await e2e.check_broker_restart(e2e_broker(postgres, prefix))


async def test_e2e_bodies_postgres_cannot_carry_are_refused(
    postgres: Postgres, prefix: str
) -> None:
    """Binary and oversized bodies: 400 and 413 from POST /publish, nothing sent."""

    broker = e2e_broker(postgres, prefix)
    async with e2e.nodes(broker, 1) as (node,), httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{node.port}/publish?topic={broker.topic('x')}"
        assert (await http.post(url, content=b"\xff\xfe binary")).status_code == 400
        assert (await http.post(url, content=b"a" * 9000)).status_code == 413
        assert (await http.post(url, content=b"fine")).status_code in (200, 202)
