"""gochan.server.handoff.Handoff on its own: a real TCP connection's socket
passed between two hand-off endpoints in one process, as two workers would."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
from collections.abc import AsyncIterator

from gochan.server.handoff import HANDOFF_SLACK_BYTES, Handoff, owner_tag, worker_of

MAX_REQUEST_BYTES = 64 * 1024


class Endpoints:
    def __init__(self, directory: str) -> None:
        self.adopted: asyncio.Queue[tuple[socket.socket, bytes]] = asyncio.Queue()
        self.sender = Handoff(directory, 0, 2, MAX_REQUEST_BYTES, self._never)
        self.owner = Handoff(
            directory, 1, 2, MAX_REQUEST_BYTES, lambda s, b: self.adopted.put_nowait((s, b))
        )

    @staticmethod
    def _never(sock: socket.socket, data: bytes) -> None:
        raise AssertionError("nothing is passed to worker 0")


@contextlib.asynccontextmanager
async def endpoints() -> AsyncIterator[Endpoints]:
    # A short directory: Unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="gochan-handoff-") as directory:
        ends = Endpoints(directory)
        try:
            yield ends
        finally:
            ends.sender.close()
            ends.owner.close()
            while not ends.adopted.empty():
                ends.adopted.get_nowait()[0].close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(the client's end, the server's accepted end) of a loopback connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    return client, accepted


def test_worker_tags() -> None:
    assert owner_tag(3) == "w3."
    assert worker_of(owner_tag(12) + "abc") == 12
    for untagged in ("abc", "w.abc", "wx.abc", "w01.abc", "x1.abc", "w1", "w\u0661.abc", ""):
        assert worker_of(untagged) == -1, untagged


async def test_socket_and_bytes_reach_the_owner() -> None:
    async with endpoints() as ends:
        ends.owner.listen(asyncio.get_running_loop())
        client, accepted = tcp_pair()
        try:
            read = b"GET /events?id=w1.x HTTP/1.1\r\nHost: a\r\n\r\n"
            assert ends.sender.send(1, accepted.fileno(), read) is None
            accepted.close()  # the sender forgets it: the connection lives on in the owner
            sock, data = await asyncio.wait_for(ends.adopted.get(), 5)
            with sock:
                assert data == read
                assert sock.getpeername() == client.getsockname()
                sock.setblocking(True)
                client.sendall(b"more")
                assert sock.recv(16) == b"more"
                sock.sendall(b"answer")
                assert client.recv(16) == b"answer"
            assert (ends.sender.sent, ends.owner.adopted) == (1, 1)
        finally:
            client.close()


async def test_refusals_leave_the_connection_with_the_sender() -> None:
    async with endpoints() as ends:
        client, accepted = tcp_pair()
        try:
            # Nobody listens for worker 1 (it is restarting): said, nothing sent.
            why = ends.sender.send(1, accepted.fileno(), b"x")
            assert why is not None and why != ""
            ends.owner.listen(asyncio.get_running_loop())
            too_big = b"x" * (MAX_REQUEST_BYTES + HANDOFF_SLACK_BYTES + 1)
            assert ends.sender.send(1, accepted.fileno(), too_big) == "too large"
            assert ends.sender.sent == 0
            accepted.sendall(b"still ours")
            assert client.recv(16) == b"still ours"
        finally:
            client.close()
            accepted.close()


async def test_message_without_one_socket_is_dropped() -> None:
    async with endpoints() as ends:
        ends.owner.listen(asyncio.get_running_loop())
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as stray:
            stray.connect(ends.owner.path(1))
            stray.sendall(b"no descriptor")
            r, w = socket.socketpair()  # not a TCP connection
            with r, w:
                socket.send_fds(stray, [b"a Unix socket"], [r.fileno()])
            await asyncio.sleep(0.1)
            assert ends.adopted.empty() and ends.owner.adopted == 0
        # The endpoint still works afterwards.
        client, accepted = tcp_pair()
        with client, accepted:
            assert ends.sender.send(1, accepted.fileno(), b"after") is None
            sock, data = await asyncio.wait_for(ends.adopted.get(), 5)
            sock.close()
            assert data == b"after"


def test_a_passed_connection_takes_no_second_token_of_the_connection_rate() -> None:
    """The worker that accepted a connection counted it against its
    address's connection rate; the owner it is passed to does not count it
    again (a browser's reconnects would otherwise use up twice their rate)."""
    from gochan import Config, Streamer
    from gochan.server.app import Server
    from gochan.server.handoff import HandoffProtocol
    from gochan.server.protocol import HttpProtocol

    config = Config(connection_rate_per_peer=1, connection_burst_per_peer=1)
    server = Server(Streamer(config), config, sweep=False)
    peer = ("10.0.0.7", 40000)
    assert server.admit(HttpProtocol(server), peer) is None  # the one token of the burst
    refused = server.admit(HttpProtocol(server), peer)
    assert refused is not None and refused[0] == 429
    assert server.admit(HandoffProtocol(server), peer) is not None  # accepted here: counted
    passed = HandoffProtocol(server, b"GET /events?id=w1.x HTTP/1.1\r\n\r\n")
    assert server.admit(passed, peer) is None
