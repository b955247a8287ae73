"""Peer: sse-starlette on uvicorn (uvloop + httptools, one worker).

GET /events?topic=A&topic=B streams `event: <topic>` / `id:` / `data:` frames after a
first `event: message` frame listing the subscriptions; POST /publish?topic=T relays
the raw body to every subscriber of T.

Run: python bench/peers/starlette_peer.py --port 8001
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import uvicorn
from hub import Hub, parse_args
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

hub = Hub()
heartbeat_s = 15.0


async def events(request: Request) -> Response:
    topics = request.query_params.getlist("topic")
    if not topics:
        return PlainTextResponse("at least one topic is required", status_code=400)
    queue = hub.subscribe(topics)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        try:
            yield ServerSentEvent(data=json.dumps({"subscriptions": topics}), event="message")
            while True:
                topic, event_id, data = await queue.get()
                yield ServerSentEvent(data=data, event=topic, id=str(event_id))
        finally:
            hub.unsubscribe(topics, queue)

    return EventSourceResponse(stream(), ping=int(heartbeat_s))


async def publish(request: Request) -> Response:
    topic = request.query_params.get("topic")
    if not topic:
        return PlainTextResponse("topic is required", status_code=400)
    body = await request.body()
    event_id = hub.publish(topic, body.decode())
    return JSONResponse({"id": str(event_id)})


app = Starlette(
    routes=[
        Route("/events", events, methods=["GET"]),
        Route("/publish", publish, methods=["POST"]),
    ]
)


def main() -> None:
    global heartbeat_s
    args = parse_args(__doc__ or "")
    heartbeat_s = args.heartbeat
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
