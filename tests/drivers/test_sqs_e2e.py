"""The SNS/SQS driver end to end through gochan's HTTP surface (tests/drivers/e2e.py),
on moto_server (see ``_sqs_server.py``), killed and restarted on the same port
for the outage."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from . import _sqs_server, e2e
from ._sqs_server import AwsServer
from .conftest import import_or_skip

sqs = import_or_skip("gochan.drivers.sqs")

SNS_PREFIX = sqs.DEFAULT_PREFIX  # the driver's default: SNS topic = prefix + topic


@pytest.fixture(scope="module")
def server() -> Iterator[AwsServer]:
    aws = _sqs_server.obtain()
    yield aws
    aws.stop()


def broker(server: AwsServer) -> e2e.Broker:
    async def publish(topic: str, data: bytes) -> None:
        async with server.client("sns") as sns:
            arn = (await sns.create_topic(Name=SNS_PREFIX + topic))["TopicArn"]
            await sns.publish(TopicArn=arn, Message=data.decode())

    async def restart() -> None:
        moto = server.moto
        assert moto is not None
        await asyncio.to_thread(moto.stop)  # it forgets every queue and topic
        await asyncio.to_thread(moto.start)

    async def subscribed(topic: str) -> bool:
        return bool(await server.subscribed_queues(SNS_PREFIX + topic))

    options: dict[str, Any] = {
        **server.driver_options(),
        "timeout": 2.0,
        "wait_time": 1,
        "reconnect_max": 0.5,
    }
    return e2e.Broker("sqs", options, publish, restart if server.moto else None, subscribed)


async def test_relay(server: AwsServer) -> None:
    await e2e.check_relay(broker(server))


async def test_subscription_lifecycle(server: AwsServer) -> None:
    await e2e.check_subscription_lifecycle(broker(server))


async def test_replay_on_the_same_node(server: AwsServer) -> None:
    await e2e.check_replay_on_the_same_node(broker(server))


async def test_broker_restart(server: AwsServer) -> None:
    if server.moto is None:
        pytest.skip("restarts its own moto_server (GOCHAN_SQS_URL is set)")
    await e2e.check_broker_restart(broker(server))
