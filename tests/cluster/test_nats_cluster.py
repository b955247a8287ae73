"""Three gochan processes on one NATS server (JetStream on), no sticky
sessions: any node serves any client, updates take effect everywhere before
they are answered, and a node killed mid-stream loses nothing."""

from __future__ import annotations

import nats

from ..drivers._nats_server import NatsServer
from ..support import SSEStream
from .nodes import (
    check_exactly_once,
    cluster,
    cluster_name,
    kill_and_resume,
    publish,
    read_until,
    update,
)


def nats_args(server: NatsServer, name: str) -> list[str]:
    return [
        "--driver", "nats",
        "--nats-url", server.url,
        "--nats-prefix", f"{name}.",
        "--nats-jetstream",
        "--nats-stream", name.upper(),
        "--cluster",
        "--cluster-name", name,
    ]  # fmt: skip


async def test_any_node_serves_any_client(nats_server: NatsServer) -> None:
    name = cluster_name()
    async with cluster(["a", "b", "c"], nats_args(nats_server, name)) as (nodes, http):
        a, b, c = nodes
        first = await SSEStream.open(a.port, "/events?topic=news")
        client_id = (await first.config())["config"]["client_id"]
        neighbour = await SSEStream.open(b.port, "/events?topic=news&topic=sport")
        await neighbour.config()

        # An update answered by a node that holds no stream of the client...
        answer = await update(http, c, client_id, add=["sport"])
        assert answer.status_code == 200, answer.text
        assert answer.json()["subscriptions"] == ["news", "sport"]
        # ...has taken effect on node a before it was answered.
        await publish(http, b, "sport", "s0")
        assert (await read_until(first, 1))[0]["data"] == "s0"
        assert (await read_until(neighbour, 1))[0]["data"] == "s0"

        # A stream opened on another node with the id keeps its topics.
        second = await SSEStream.open(b.port, f"/events?id={client_id}")
        assert (await second.config())["subscriptions"] == ["news", "sport"]

        # Every message published on any node, or by NATS's own client,
        # reaches every subscribed stream once.
        own = await nats.connect(nats_server.url)
        js = own.jetstream()
        sent: dict[str, list[str]] = {"news": [], "sport": []}
        for n in range(24):
            topic = ("news", "sport")[n % 2]
            body = f"{topic}-{n}"
            if n % 4 == 3:
                await js.publish(f"{name}.{topic}", body.encode())
            else:
                await publish(http, nodes[n % 3], topic, body)
            sent[topic].append(body)
        await own.close()
        check_exactly_once(await read_until(first, 24), sent)
        check_exactly_once(await read_until(second, 24), sent)
        check_exactly_once(await read_until(neighbour, 24), sent)

        # Removing on yet another node ends delivery on every stream.
        answer = await update(http, a, client_id, remove=["news"])
        assert answer.json()["subscriptions"] == ["sport"]
        await publish(http, c, "news", "late")
        await publish(http, c, "sport", "last")
        assert [f["data"] for f in await read_until(second, 1)] == ["last"]
        assert [f["data"] for f in await read_until(first, 1)] == ["last"]
        for stream in (first, second, neighbour):
            await stream.close()


async def test_a_killed_node_loses_nothing(nats_server: NatsServer) -> None:
    name = cluster_name()
    async with cluster(["a", "b", "c"], nats_args(nats_server, name)) as (nodes, http):
        a, b, c = nodes
        stream = await SSEStream.open(a.port, "/events?topic=given")
        client_id = (await stream.config())["config"]["client_id"]
        answer = await update(http, b, client_id, add=["added"])  # after connect, elsewhere
        assert answer.status_code == 200, answer.text

        sent: dict[str, list[str]] = {"given": [], "added": []}
        again = await kill_and_resume(http, stream, client_id, a, (b, c), c, sent)

        # The dead holder does not hold updates up: once it is missed, an
        # update is answered (waiting for nobody's acknowledgement).
        answer = await update(http, b, client_id, add=["third"])
        assert answer.status_code == 200, answer.text
        await publish(http, b, "third", "t")
        assert (await read_until(again, 1))[0]["data"] == "t"
        await again.close()
