"""Peer: aiohttp + aiohttp-sse on uvloop.

GET /events?topic=A&topic=B streams `event: <topic>` / `id:` / `data:` frames after a
first `event: message` frame listing the subscriptions; POST /publish?topic=T relays
the raw body to every subscriber of T.

Run: python bench/peers/aiohttp_peer.py --port 8002
"""

from __future__ import annotations

import json

import uvloop
from aiohttp import web
from aiohttp_sse import sse_response
from hub import Hub, parse_args

HUB = web.AppKey("hub", Hub)
HEARTBEAT = web.AppKey("heartbeat", float)


async def events(request: web.Request) -> web.StreamResponse:
    topics = request.query.getall("topic", [])
    if not topics:
        raise web.HTTPBadRequest(text="at least one topic is required")
    hub = request.app[HUB]
    queue = hub.subscribe(topics)
    try:
        async with sse_response(request, ping_interval=request.app[HEARTBEAT]) as resp:
            await resp.send(json.dumps({"subscriptions": topics}), event="message")
            while resp.is_connected():
                topic, event_id, data = await queue.get()
                await resp.send(data, event=topic, id=str(event_id))
    finally:
        hub.unsubscribe(topics, queue)
    return resp


async def publish(request: web.Request) -> web.Response:
    topic = request.query.get("topic")
    if not topic:
        raise web.HTTPBadRequest(text="topic is required")
    data = await request.text()
    event_id = request.app[HUB].publish(topic, data)
    return web.json_response({"id": str(event_id)})


def main() -> None:
    args = parse_args(__doc__ or "")
    app = web.Application()
    app[HUB] = Hub()
    app[HEARTBEAT] = args.heartbeat
    app.router.add_get("/events", events)
    app.router.add_post("/publish", publish)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
