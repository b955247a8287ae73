from cpython.object cimport PyObject


# Packed: 12 bytes, not 16 with the padding after an int. An idle stream's
# table is its topics' count of these (bench/profiles/connection_memory.md).
cdef packed struct Membership:
    PyObject* topic          # borrowed: the Topic is alive while it has members
    int index                # this subscriber's slot in topic.slots (< INT_MAX)


cdef class Topic:
    cdef readonly str name
    # Borrowed pointers to Subscribers; a subscriber leaves every topic before
    # it can be freed (Hub.close, and Subscriber.__dealloc__ as a last resort).
    cdef PyObject** slots
    cdef Py_ssize_t count, capacity

    cdef int _append(self, Subscriber sub) except -1
    cdef void _remove_at(self, Py_ssize_t index) noexcept


cdef class Subscriber:
    # One per idle connection: the 8-byte fields first, then the 4-byte
    # counts and the 1-byte flags, packed, so that a Stream (this and three
    # Python slots) fits a 160-byte allocation (bench/profiles/connection_memory.md).
    cdef readonly Hub hub
    cdef readonly object transport
    cdef readonly object owner       # what the caller attached (the Client)
    # Frames queued since the last flush (owned references).
    cdef PyObject** queue
    cdef Membership* members
    cdef Py_ssize_t queue_bytes
    # When it joined the hub (CLOCK_MONOTONIC), for the stream duration
    # histogram; 0 once observed (Hub.close may run more than once).
    cdef double opened_at
    # Bytes handed to the socket or the transport, head included.
    cdef readonly unsigned long long bytes_out
    # The socket, when frames may be written to it directly (plain TCP, and
    # only while the transport holds nothing: see Subscriber.__cinit__); -1
    # sends everything through the transport.
    cdef int fd
    # Array lengths and sizes (_grow_small keeps them within an int).
    cdef int queue_len, queue_cap
    cdef int members_len, members_cap
    # Its place in Hub.open (-1: not there).
    cdef int open_index
    cdef unsigned char dirty, active
    # Read from Python as the properties paused and closed.
    cdef unsigned char _paused, _closed

    cdef int _enqueue(self, bytes frame) except -1
    cdef int _append(self, bytes frame) except -1
    cdef void _clear_queue(self) noexcept
    cdef Py_ssize_t _find(self, PyObject* topic) noexcept
    cdef int _write_queue(self) except -1
    cdef int _send_direct(self) except -1
    cdef void _reset(self) noexcept
    cdef bytes _joined(self, Py_ssize_t skip)


cdef class Hub:
    cdef dict topics                 # name -> Topic
    # Every open Subscriber (owned references), in no set order: an array
    # with swap-remove, one pointer per stream where a set took 16 bytes at
    # a fill of 15 to 60%.
    cdef PyObject** open
    cdef Py_ssize_t open_len, open_cap
    cdef list dirty                  # Subscribers with frames to write
    cdef list doomed                 # slow consumers to cut at the next flush
    # (deadline, Subscriber) of slow consumers being cut: reset once their
    # peer has taken what was already written, or at the deadline.
    cdef list cutting
    cdef readonly double cut_linger
    cdef bint flush_scheduled
    cdef object _call_soon
    cdef object _call_later
    cdef object _flush_cb
    # Adaptive flush delay (see Hub.flush): how long the next flush waits.
    cdef readonly double max_delay
    cdef readonly double next_delay
    cdef readonly Py_ssize_t max_pending
    cdef readonly unsigned long long deliveries
    cdef readonly unsigned long long messages
    cdef readonly unsigned long long writes
    cdef readonly unsigned long long bytes_written
    cdef readonly unsigned long long slow_disconnects
    cdef readonly unsigned long long direct_writes
    cdef readonly bint direct
    cdef readonly unsigned long long streams_opened
    # Publish-to-write latency, one observation per message that reached a
    # stream: when each message since the last flush reached the streamer;
    # the flush observes them all at its end.
    cdef readonly Histogram latency
    cdef readonly Histogram durations  # stream lifetimes, observed at Hub.close
    cdef double* timed
    cdef Py_ssize_t timed_len, timed_cap
    cdef readonly int send_buffer     # SO_SNDBUF for stream sockets; 0: the kernel's

    cpdef Py_ssize_t publish(self, str topic, bytes frame, double since=*) except -1
    cdef inline int _mark_dirty(self, Subscriber sub) except -1
    cdef int _detach(self, Subscriber sub, Py_ssize_t member) except -1
    cdef bint _subscribe(self, Subscriber sub, str topic) except -1
    cdef int _cut(self, Subscriber sub) except -1
    cdef int _add_open(self, Subscriber sub) except -1
    cdef void _drop_open(self, Subscriber sub) noexcept
