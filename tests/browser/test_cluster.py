"""Cluster nodes behind a load balancer: which node answered is in the
answer (X-Gochan-Node)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson

from gochan import Config
from gochan.client import Client
from gochan.server.routes import Router

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
