"""An SNS/SQS endpoint for the driver tests: moto's server on a free loopback
port, stoppable and restartable on the SAME port (an outage, which also makes
it forget every queue and topic), or ``$GOCHAN_SQS_URL`` (LocalStack, a
shared moto), which cannot be restarted."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from ._process import start_process, stop_process
from .conftest import (
    broker_unavailable,
    free_port,
    import_or_skip,
)

REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
START_TIMEOUT_S = 30.0


class MotoServer:
    def __init__(self) -> None:
        import_or_skip("moto.server")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = start_process(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            self.port,
            START_TIMEOUT_S,
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)


@dataclass
class AwsServer:
    url: str
    moto: MotoServer | None

    def driver_options(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.url,
            "region": REGION,
            "access_key_id": CREDENTIALS["aws_access_key_id"],
            "secret_access_key": CREDENTIALS["aws_secret_access_key"],
        }

    def client(self, service: str) -> Any:
        """An ordinary AWS SDK client (aiobotocore), not the driver."""
        get_session = import_or_skip("aiobotocore.session").get_session
        return get_session().create_client(
            service, region_name=REGION, endpoint_url=self.url, **CREDENTIALS
        )

    async def subscribed_queues(self, sns_topic_name: str) -> list[str]:
        """Endpoints (queue ARNs) subscribed to an SNS topic, as SNS reports them."""
        async with self.client("sns") as sns:
            arn = (await sns.create_topic(Name=sns_topic_name))["TopicArn"]
            subs = await sns.list_subscriptions_by_topic(TopicArn=arn)
            return [s["Endpoint"] for s in subs["Subscriptions"]]

    def stop(self) -> None:
        if self.moto is not None:
            self.moto.stop()


def obtain() -> AwsServer:
    url = os.environ.get("GOCHAN_SQS_URL")
    if url:
        return AwsServer(url, None)
    try:
        moto = MotoServer()
    except (OSError, RuntimeError) as exc:
        broker_unavailable(f"cannot start moto_server (pip install 'moto[server]'): {exc}")
    return AwsServer(moto.url, moto)
