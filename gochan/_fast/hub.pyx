# Topic table and fan-out.
#
# A Topic keeps its subscribers in a compact C array of borrowed pointers; a
# Subscriber keeps, for each topic it is in, the Topic and its slot index, so
# leaving a topic is O(1): the last slot is moved into the hole and the moved
# subscriber's index is fixed up (a scan of its own few memberships).
#
# Publishing walks one array and appends the same frame object to each
# subscriber's queue: no Python object is allocated per delivery. Queues are
# written once per loop iteration (Hub.flush, scheduled with call_soon), so all
# frames for one connection within an iteration leave in one write.
#
# That write is a writev() on the socket itself, straight from the queued
# frames (no join, no call into the transport), whenever the transport's own
# buffer is empty. Its high-water mark is set to 0, so the transport calls
# pause_writing() as soon as it holds a byte and resume_writing() once it has
# drained: `paused` is exactly "the transport has data", and ordering holds.
# Whatever the kernel does not take goes to transport.write(), which buffers
# it, polls the socket and pauses us; while paused, frames wait in our queue,
# bounded by max_pending.
#
# Under load the cost is the syscall per connection per flush, not the bytes,
# so the flush adapts: when one took a while (many sockets written), the next
# waits about as long, up to max_delay, letting more frames collect per
# connection. At light load flushes run in the same loop iteration.
#
# A stream's kernel send buffer is capped (send_buffer), so what a stuck
# reader pins is bounded by our own queue plus that cap. A slow consumer is
# cut at a frame boundary: the frames it had not started are dropped at once
# (the queue only ever holds whole frames), and what was already written (the
# rest of a frame the kernel took in part, in the transport, and the kernel's
# copy) is left to reach the peer. Once the socket has nothing unsent or
# unacknowledged (SIOCOUTQ 0), or at the cut_linger deadline for a peer that
# does not read, it is reset (SO_LINGER 0): the kernel's memory is freed at
# once instead of an orphaned socket sitting in FIN-WAIT-1, and the client
# sees an error, reconnects and replays. A reset with bytes still in flight
# loses them, which would end the peer's stream mid-frame: hence the wait.
#
# Two histograms are kept for /metrics, each observation a few C operations:
# per message (never per delivery) the time from its arrival at the streamer
# to the end of the flush that wrote it to its streams, and per stream its
# lifetime when it closes.

from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_DECREF
from cpython.mem cimport PyMem_Realloc, PyMem_Free
from cpython.dict cimport PyDict_GetItem
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_FromStringAndSize,
                            PyBytes_GET_SIZE)
from libc.limits cimport INT_MAX
from libc.string cimport memcpy
from libc.errno cimport errno, EAGAIN, EINTR
from posix.uio cimport iovec, writev
from posix.unistd cimport write as fd_write
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC


cdef extern from "<sys/socket.h>" nogil:
    cdef struct linger:
        int l_onoff
        int l_linger
    int setsockopt(int fd, int level, int name, const void* value, unsigned int size)
    enum: SOL_SOCKET
    enum: SO_LINGER
    enum: SO_SNDBUF

cdef extern from "<sys/ioctl.h>" nogil:
    # TIOCOUTQ is SIOCOUTQ on Linux: bytes a TCP socket has not had acked.
    int ioctl(int fd, unsigned long request, ...)
    enum: TIOCOUTQ

import logging as _logging

_log = _logging.getLogger("gochan.server")

# Bytes of unsent output a connection may hold before it is dropped as a slow
# consumer (it reconnects and replays).
DEFAULT_MAX_PENDING = 1 << 20
# Longest wait (seconds) the adaptive flush adds under load (0: never waits).
DEFAULT_MAX_FLUSH_DELAY = 0.0
# Kernel send buffer asked for each stream socket (bytes; Linux doubles it
# for bookkeeping). 0 leaves the kernel's autotuning, which lets a stuck
# reader pin megabytes of kernel memory.
DEFAULT_SEND_BUFFER = 256 * 1024  # see gochan/config.py
# Longest wait (seconds) for a slow consumer being cut to take what was
# already written to it, before it is reset anyway.
DEFAULT_CUT_LINGER = 5.0
# A flush shorter than this (seconds) means light load: the next one runs at
# once, with no added latency.
cdef double BUSY_FLUSH_S = 0.002
# Bucket bounds (seconds) of the two histograms (see gochan/server/metrics.py).
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                     0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STREAM_DURATION_BUCKETS_S = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
                             10800.0, 21600.0, 43200.0, 86400.0)


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef void* _grow(void* ptr, Py_ssize_t* capacity, Py_ssize_t initial,
                 size_t item_size) except NULL:
    cdef Py_ssize_t cap = capacity[0] * 2 if capacity[0] else initial
    cdef void* new = PyMem_Realloc(ptr, <size_t>cap * item_size)
    if new == NULL:
        raise MemoryError()
    capacity[0] = cap
    return new


cdef void* _grow_small(void* ptr, int* capacity, int initial, size_t item_size) except NULL:
    # _grow for the int-sized arrays of a Subscriber.
    cdef Py_ssize_t cap = capacity[0]
    if cap > INT_MAX // 2:
        raise MemoryError()
    ptr = _grow(ptr, &cap, initial, item_size)
    capacity[0] = <int>cap
    return ptr


cdef int _direct_fd(object transport) except -2:
    # The socket of a plain TCP transport, or -1 (TLS, pipes, test doubles).
    get_extra_info = getattr(transport, "get_extra_info", None)
    if get_extra_info is None or get_extra_info("sslcontext") is not None:
        return -1
    if not hasattr(transport, "set_write_buffer_limits"):
        return -1
    sock = get_extra_info("socket")
    if sock is None:
        return -1
    try:
        return sock.fileno()
    except Exception:
        return -1


cdef bint _is_closing(object transport):
    is_closing = getattr(transport, "is_closing", None)
    return is_closing is not None and is_closing()


cdef bint _drained(Subscriber sub):
    # Everything written to this stream has reached its peer: nothing in the
    # transport, nothing unsent or unacknowledged in the kernel. Without a
    # socket of our own to ask (TLS, test doubles), the transport's word.
    cdef int unsent = 0
    get_size = getattr(sub.transport, "get_write_buffer_size", None)
    if get_size is not None and get_size():
        return False
    if sub.fd < 0:
        return True
    if ioctl(sub.fd, TIOCOUTQ, &unsent) < 0:
        return False  # cannot tell (not Linux): wait for the deadline
    return unsent == 0


cdef class Topic:
    def __cinit__(self, str name):
        self.name = name
        self.slots = NULL
        self.count = 0
        self.capacity = 0

    def __dealloc__(self):
        PyMem_Free(self.slots)

    def __len__(self):
        return self.count

    cdef int _append(self, Subscriber sub) except -1:
        if self.count >= INT_MAX:  # a Membership keeps the slot as an int
            raise MemoryError()
        if self.count == self.capacity:
            self.slots = <PyObject**>_grow(self.slots, &self.capacity,
                                           TOPIC_INITIAL_SLOTS, sizeof(PyObject*))
        self.slots[self.count] = <PyObject*>sub
        self.count += 1
        return 0

    cdef void _remove_at(self, Py_ssize_t index) noexcept:
        cdef Py_ssize_t last = self.count - 1
        cdef Subscriber moved
        cdef void* smaller
        if index != last:
            self.slots[index] = self.slots[last]
            moved = <Subscriber>self.slots[index]
            moved.members[moved._find(<PyObject*>self)].index = <int>index
        self.count = last
        # Give memory back when a big topic empties out.
        if self.capacity > TOPIC_INITIAL_SLOTS and self.count * 4 <= self.capacity:
            smaller = PyMem_Realloc(self.slots, <size_t>(self.capacity // 2) * sizeof(PyObject*))
            if smaller != NULL:
                self.slots = <PyObject**>smaller
                self.capacity //= 2


cdef class Subscriber:
    """One SSE stream's place in the fan-out: its queue and its topics."""

    def __cinit__(self, Hub hub not None, object transport, object owner=None, *args, **kwargs):
        # *args, **kwargs: what a Python subclass (gochan.stream.Stream) adds.
        self.hub = hub
        self.transport = transport
        self.owner = owner
        self.fd = -1
        if hub.direct:
            self.fd = _direct_fd(transport)
        self.queue = NULL
        self.queue_len = self.queue_cap = self.queue_bytes = 0
        self.members = NULL
        self.members_len = self.members_cap = 0
        self._paused = self.dirty = self.active = self._closed = False
        self.bytes_out = 0
        self.opened_at = _now()
        hub.streams_opened += 1
        if self.fd >= 0:
            if hub.send_buffer > 0:
                setsockopt(self.fd, SOL_SOCKET, SO_SNDBUF, &hub.send_buffer, sizeof(int))
            transport.set_write_buffer_limits(0)
            # Data still in the transport (a large response head): wait for
            # its resume_writing() before writing around it.
            self._paused = transport.get_write_buffer_size() > 0
        self.open_index = -1
        hub._add_open(self)

    def __dealloc__(self):
        # Hub.close() has normally run. Only C memory and owned frames are
        # released here: the Topics may already be gone at interpreter exit.
        self._clear_queue()
        PyMem_Free(self.queue)
        PyMem_Free(self.members)

    @property
    def topics(self):
        """Names of the topics this stream is in (in no set order)."""
        return [(<Topic>self.members[i].topic).name for i in range(self.members_len)]

    @property
    def paused(self):
        """Frames are held: the transport holds data the kernel has not taken."""
        return self._paused != 0

    @property
    def closed(self):
        """It is out of the fan-out: closed, or dropped as a slow consumer."""
        return self._closed != 0

    @property
    def pending_bytes(self):
        """Bytes queued and not yet handed to the transport."""
        return self.queue_bytes

    def send(self, bytes frame not None, bint bounded=True):
        """Queue one frame for this stream only (its head, system frames,
        replay). ``bounded=False``: past max_pending too (a stream's head,
        its last frame)."""
        if self._closed:
            return False
        if bounded:
            self._enqueue(frame)
        else:
            self._append(frame)
        self.active = True
        self.hub._mark_dirty(self)
        return True

    def send_first(self, bytes head not None):
        """Write a new stream's head (HTTP head and first frames). Straight
        to the socket when nothing is ahead of it, so an idle stream keeps no
        queue array for it; what the kernel does not take goes to the
        transport, and the stream waits for it (``resume``) before writing
        anything else. Else it is queued first, like ``send``."""
        cdef Py_ssize_t size = PyBytes_GET_SIZE(head)
        cdef ssize_t sent
        if self._closed:
            return False
        if self.fd < 0 or self._paused or self.queue_len:
            return self.send(head, False)
        sent = fd_write(self.fd, PyBytes_AS_STRING(head), size)
        if sent < 0:
            if errno != EAGAIN and errno != EINTR:
                raise OSError(errno, "write failed")
            sent = 0
        self.hub.writes += 1
        self.hub.direct_writes += 1
        self.hub.bytes_written += size
        self.bytes_out += size
        if sent < size:
            self._paused = True  # until the transport has written the rest
            self.transport.write(head[sent:])
        self.active = True
        return True

    cdef int _append(self, bytes frame) except -1:
        # Queue one frame whatever the bound says.
        if self.queue_len == self.queue_cap:
            self.queue = <PyObject**>_grow_small(self.queue, &self.queue_cap,
                                                 QUEUE_INITIAL_SLOTS, sizeof(PyObject*))
        Py_INCREF(frame)
        self.queue[self.queue_len] = <PyObject*>frame
        self.queue_len += 1
        self.queue_bytes += PyBytes_GET_SIZE(frame)
        return 0

    def pause(self):
        """The transport's buffer is full (``pause_writing``): hold frames."""
        self._paused = True

    def resume(self):
        """The transport drained (``resume_writing``): write what was held."""
        self._paused = False
        if self.queue_len and not self._closed:
            self._write_queue()

    cdef int _enqueue(self, bytes frame) except -1:
        cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
        if self.queue_bytes + size > self.hub.max_pending:
            # A slow consumer: drop it rather than grow without bound.
            self._closed = True
            self._clear_queue()
            self.hub.doomed.append(self)
            self.hub._mark_dirty(self)
            return 0
        return self._append(frame)

    cdef void _clear_queue(self) noexcept:
        cdef Py_ssize_t i
        for i in range(self.queue_len):
            Py_DECREF(<object>self.queue[i])
        self.queue_len = 0
        self.queue_bytes = 0
        if self.queue_cap > QUEUE_KEEP_SLOTS:
            PyMem_Free(self.queue)
            self.queue = NULL
            self.queue_cap = 0

    cdef void _reset(self) noexcept:
        # Abort with RST: what the kernel still holds for this socket is
        # dropped now, and the peer learns at once that it was cut.
        cdef linger lg
        if self.fd >= 0:
            lg.l_onoff = 1
            lg.l_linger = 0
            setsockopt(self.fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
        try:
            self.transport.abort()
        except Exception:
            pass

    cdef Py_ssize_t _find(self, PyObject* topic) noexcept:
        cdef Py_ssize_t i
        for i in range(self.members_len):
            if self.members[i].topic == topic:
                return i
        return -1

    cdef int _write_queue(self) except -1:
        # One write for everything queued: writev() on the socket when the
        # transport is empty, else the frame itself (no copy) or one joined
        # buffer through the transport.
        cdef object data
        if self.queue_len == 0:
            return 0
        if self.fd >= 0 and not self._paused and self.queue_len <= MAX_IOV:
            return self._send_direct()
        data = <object>self.queue[0] if self.queue_len == 1 else self._joined(0)
        self.hub.writes += 1
        self.hub.bytes_written += self.queue_bytes
        self.bytes_out += self.queue_bytes
        self._clear_queue()
        self.transport.write(data)
        return 0

    cdef bytes _joined(self, Py_ssize_t skip):
        # The queued frames as one bytes object, without their first `skip` bytes.
        cdef bytes data = PyBytes_FromStringAndSize(NULL, self.queue_bytes - skip)
        cdef char* out = PyBytes_AS_STRING(data)
        cdef Py_ssize_t i, size, pos = 0
        cdef const char* src
        for i in range(self.queue_len):
            src = PyBytes_AS_STRING(<object>self.queue[i])
            size = PyBytes_GET_SIZE(<object>self.queue[i])
            if skip >= size:
                skip -= size
                continue
            memcpy(out + pos, src + skip, size - skip)
            pos += size - skip
            skip = 0
        return data

    cdef int _send_direct(self) except -1:
        cdef iovec iov[MAX_IOV]
        cdef Py_ssize_t i, total = self.queue_bytes
        cdef ssize_t sent
        cdef bytes rest
        for i in range(self.queue_len):
            iov[i].iov_base = PyBytes_AS_STRING(<object>self.queue[i])
            iov[i].iov_len = PyBytes_GET_SIZE(<object>self.queue[i])
        sent = writev(self.fd, iov, <int>self.queue_len)
        if sent < 0:
            if errno != EAGAIN and errno != EINTR:  # EWOULDBLOCK == EAGAIN on Linux
                raise OSError(errno, "writev failed")
            sent = 0
        self.hub.writes += 1
        self.hub.direct_writes += 1
        self.hub.bytes_written += total
        self.bytes_out += total
        if sent == total:
            self._clear_queue()
            return 0
        # The kernel took part of it: the transport buffers the rest, starts
        # polling the socket and pauses us until it has drained.
        rest = self._joined(sent)
        self._clear_queue()
        self.transport.write(rest)
        return 0


cdef class Hub:
    """Topic -> subscribers table and the fan-out that writes to them."""

    def __cinit__(self, loop, Py_ssize_t max_pending=DEFAULT_MAX_PENDING, bint direct=True,
                  double max_delay=DEFAULT_MAX_FLUSH_DELAY, int send_buffer=DEFAULT_SEND_BUFFER,
                  double cut_linger=DEFAULT_CUT_LINGER,
                  latency_buckets=LATENCY_BUCKETS_S,
                  duration_buckets=STREAM_DURATION_BUCKETS_S):
        if max_pending <= 0:
            raise ValueError("max_pending must be positive")
        if cut_linger < 0:
            raise ValueError("cut_linger cannot be negative")
        self.cut_linger = cut_linger
        self.cutting = []
        if send_buffer < 0:
            raise ValueError("send_buffer cannot be negative")
        self.send_buffer = send_buffer
        if max_delay < 0:
            raise ValueError("max_delay cannot be negative")
        self.max_delay = max_delay
        self.next_delay = 0.0
        self._call_later = loop.call_later
        # Write to sockets directly (see the top of this file); off, every
        # write goes through transport.write().
        self.direct = direct
        self.direct_writes = 0
        self.topics = {}
        self.open = NULL
        self.open_len = self.open_cap = 0
        self.dirty = []
        self.doomed = []
        self.flush_scheduled = False
        self._call_soon = loop.call_soon
        self._flush_cb = self.flush
        self.max_pending = max_pending
        self.deliveries = self.messages = self.writes = 0
        self.bytes_written = self.slow_disconnects = 0
        self.streams_opened = 0
        self.latency = Histogram(latency_buckets)
        self.durations = Histogram(duration_buckets)
        self.timed = NULL
        self.timed_len = self.timed_cap = 0

    def __dealloc__(self):
        PyMem_Free(self.timed)
        # Streams still open hold the hub (Subscriber.hub), so it is freed
        # with some open only once the collector has cleared those.
        while self.open_len:
            self.open_len -= 1
            (<Subscriber>self.open[self.open_len]).open_index = -1
            Py_DECREF(<object>self.open[self.open_len])
        PyMem_Free(self.open)

    cdef int _add_open(self, Subscriber sub) except -1:
        if self.open_len == self.open_cap:
            self.open = <PyObject**>_grow(self.open, &self.open_cap, OPEN_INITIAL_SLOTS,
                                          sizeof(PyObject*))
        Py_INCREF(sub)
        self.open[self.open_len] = <PyObject*>sub
        sub.open_index = self.open_len
        self.open_len += 1
        return 0

    cdef void _drop_open(self, Subscriber sub) noexcept:
        cdef Py_ssize_t index = sub.open_index
        cdef Subscriber moved
        if index < 0:
            return
        self.open_len -= 1
        moved = <Subscriber>self.open[self.open_len]
        self.open[index] = <PyObject*>moved
        moved.open_index = index
        sub.open_index = -1
        Py_DECREF(sub)  # the caller holds its own reference

    cdef inline int _mark_dirty(self, Subscriber sub) except -1:
        if not sub.dirty:
            sub.dirty = True
            self.dirty.append(sub)
            if not self.flush_scheduled:
                self.flush_scheduled = True
                if self.next_delay > 0.0:
                    self._call_later(self.next_delay, self._flush_cb)
                else:
                    self._call_soon(self._flush_cb)
        return 0

    cpdef Py_ssize_t publish(self, str topic, bytes frame, double since=0.0) except -1:
        """Queue ``frame`` on every subscriber of ``topic``; returns how many.
        ``since``: when the message reached the streamer (``time.monotonic()``;
        0: now), for the publish-to-write histogram."""
        cdef PyObject* found = PyDict_GetItem(self.topics, topic)
        cdef Topic t
        cdef Subscriber sub
        cdef Py_ssize_t i, delivered = 0
        self.messages += 1
        if found == NULL:
            return 0
        t = <Topic>found
        for i in range(t.count):
            sub = <Subscriber>t.slots[i]
            if sub._closed:
                continue
            sub._enqueue(frame)
            sub.active = True
            self._mark_dirty(sub)
            delivered += 1
        self.deliveries += delivered
        if delivered and self.timed_len < MAX_TIMED_MESSAGES:
            # Timed once per message; the flush this publish scheduled (or
            # one already due) observes it.
            if self.timed_len == self.timed_cap:
                self.timed = <double*>_grow(self.timed, &self.timed_cap,
                                            TIMED_INITIAL_SLOTS, sizeof(double))
            self.timed[self.timed_len] = since if since > 0.0 else _now()
            self.timed_len += 1
        return delivered

    def subscribe(self, Subscriber sub not None, str topic not None):
        """Put ``sub`` in ``topic``; False if it was there already or is closed."""
        if sub._closed or sub.hub is not self:
            return False
        return self._subscribe(sub, topic)

    def subscribe_all(self, Subscriber sub not None, topics not None):
        """Put ``sub`` in each of ``topics`` (a list or tuple of str); returns
        how many it was not in yet. Its membership table is sized once, exactly."""
        cdef Py_ssize_t wanted, added = 0
        cdef void* grown
        if sub._closed or sub.hub is not self:
            return 0
        if not isinstance(topics, (list, tuple)):
            topics = tuple(topics)
        wanted = sub.members_len + len(topics)
        if wanted > INT_MAX:
            raise MemoryError()
        if wanted > sub.members_cap:
            grown = PyMem_Realloc(sub.members, <size_t>wanted * sizeof(Membership))
            if grown == NULL:
                raise MemoryError()
            sub.members = <Membership*>grown
            sub.members_cap = <int>wanted
        for topic in topics:
            added += self._subscribe(sub, topic)
        return added

    cdef bint _subscribe(self, Subscriber sub, str topic) except -1:
        cdef PyObject* found
        cdef Topic t
        if topic is None:
            raise TypeError("a topic must be a str")
        found = PyDict_GetItem(self.topics, topic)
        if found == NULL:
            t = Topic(topic)
            self.topics[topic] = t
        else:
            t = <Topic>found
            if sub._find(found) >= 0:
                return False
        if sub.members_len == sub.members_cap:
            sub.members = <Membership*>_grow_small(sub.members, &sub.members_cap,
                                                   MEMBER_INITIAL_SLOTS, sizeof(Membership))
        t._append(sub)
        sub.members[sub.members_len].topic = <PyObject*>t
        sub.members[sub.members_len].index = <int>(t.count - 1)
        sub.members_len += 1
        return True

    def unsubscribe(self, Subscriber sub not None, str topic not None):
        """Take ``sub`` out of ``topic``; False if it was not in it."""
        cdef PyObject* found = PyDict_GetItem(self.topics, topic)
        cdef Py_ssize_t member
        if found == NULL:
            return False
        member = sub._find(found)
        if member < 0:
            return False
        self._detach(sub, member)
        return True

    cdef int _detach(self, Subscriber sub, Py_ssize_t member) except -1:
        cdef Topic t = <Topic>sub.members[member].topic
        t._remove_at(sub.members[member].index)
        sub.members_len -= 1
        sub.members[member] = sub.members[sub.members_len]
        if t.count == 0:
            del self.topics[t.name]
        return 0

    def close(self, Subscriber sub not None):
        """Take ``sub`` out of every topic and drop what it had queued."""
        if sub.opened_at > 0.0:
            self.durations.observe(_now() - sub.opened_at)
            sub.opened_at = 0.0
        sub._closed = True
        sub._clear_queue()
        while sub.members_len:
            self._detach(sub, sub.members_len - 1)
        self._drop_open(sub)

    def finish(self, Subscriber sub not None, bytes frame=None):
        """End a stream gracefully: hand what is queued (and ``frame``) to the
        transport, then close it; the transport sends all of it before the
        FIN, a paused stream's backlog included (it is bounded by
        max_pending). Whoever ends streams en masse bounds the wait
        (Server.shutdown aborts what is left after its grace period).

        The last frame always follows whole frames: the queue holds only
        whole frames, and a frame the kernel took in part has its rest in
        the transport, ahead of anything handed to it after. A stream
        already cut as a slow consumer gets nothing more (its unstarted
        frames are gone): it is only closed, after what it had started."""
        cdef object data
        if not sub._closed:
            if frame is not None:
                sub._append(frame)  # past the bound too: one small last frame
            try:
                if not sub._paused:
                    sub._write_queue()
                elif sub.queue_len:
                    data = sub._joined(0)
                    self.writes += 1
                    self.bytes_written += sub.queue_bytes
                    sub.bytes_out += sub.queue_bytes
                    sub._clear_queue()
                    sub.transport.write(data)
            except Exception:
                pass
        self.close(sub)
        sub.transport.close()

    def flush(self):
        """Write every queue that has frames (runs once per loop iteration,
        or after the adaptive delay under load)."""
        cdef Subscriber sub
        cdef list dirty = self.dirty
        cdef double started = _now(), ended, took
        cdef Py_ssize_t i
        self.flush_scheduled = False
        self.dirty = []
        for sub in dirty:
            sub.dirty = False
            if sub._closed or sub._paused:
                continue
            try:
                sub._write_queue()
            except Exception as exc:
                _log.debug("write failed, closing stream: %r", exc)
                self.close(sub)
                sub.transport.abort()
        if self.doomed:
            dirty = self.doomed
            self.doomed = []
            for sub in dirty:
                self.slow_disconnects += 1
                self.close(sub)
                self._cut(sub)
        ended = _now()
        for i in range(self.timed_len):
            self.latency.observe(ended - self.timed[i])
        self.timed_len = 0
        if self.timed_cap > TIMED_INITIAL_SLOTS * 16:  # a burst is over: give it back
            PyMem_Free(self.timed)
            self.timed = NULL
            self.timed_cap = 0
        took = ended - started
        self.next_delay = 0.0 if took < BUSY_FLUSH_S else min(took, self.max_delay)

    cdef int _cut(self, Subscriber sub) except -1:
        # A slow consumer, closed (its unstarted frames dropped): reset it now
        # if its peer has everything already written, else once it has, or
        # at the deadline (see the top of this file).
        if _is_closing(sub.transport):
            return 0
        if _drained(sub):
            sub._reset()
        else:
            self.cutting.append((_now() + self.cut_linger, sub))
        return 0

    def sweep(self, double now):
        """Reset the slow consumers being cut whose peer has taken what was
        written to them, or whose deadline (``time.monotonic()`` clock) is
        past; returns how many. Run on the streamer's tick; ``sweep(inf)``
        resets every one (shutdown's end)."""
        cdef list keep = []
        cdef Subscriber sub
        cdef double deadline
        cdef Py_ssize_t reset = 0
        if not self.cutting:
            return 0
        for deadline, sub in self.cutting:
            if _is_closing(sub.transport):
                continue  # gone already (the peer closed, or a shutdown)
            if now >= deadline or _drained(sub):
                sub._reset()
                reset += 1
            else:
                keep.append((deadline, sub))
        self.cutting = keep
        return reset

    @property
    def cutting_count(self):
        """Slow consumers cut and waiting for their peer to take what was
        already written to them."""
        return len(self.cutting)

    def heartbeat(self, bytes frame not None):
        """Send ``frame`` to every stream that sent nothing since the last call."""
        cdef Subscriber sub
        cdef Py_ssize_t i, sent = 0
        for i in range(self.open_len):
            sub = <Subscriber>self.open[i]
            if sub._closed:
                continue
            if sub.active:
                sub.active = False
                continue
            sub._enqueue(frame)
            self._mark_dirty(sub)
            sent += 1
        return sent

    def subscriber_count(self, str topic not None):
        """How many streams are in ``topic``."""
        cdef PyObject* found = PyDict_GetItem(self.topics, topic)
        return 0 if found == NULL else (<Topic>found).count

    @property
    def topic_count(self):
        return len(self.topics)

    @property
    def connection_count(self):
        return self.open_len

    def open_subscribers(self):
        """A snapshot list of the open subscribers."""
        return [<object>self.open[i] for i in range(self.open_len)]

    def stats(self):
        return {
            "connections": self.open_len,
            "topics": len(self.topics),
            "messages": self.messages,
            "deliveries": self.deliveries,
            "writes": self.writes,
            "direct_writes": self.direct_writes,
            "bytes_written": self.bytes_written,
            "slow_disconnects": self.slow_disconnects,
            "streams_opened": self.streams_opened,
        }
