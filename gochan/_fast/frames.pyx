# SSE frame encoding. A frame is built once per message as one bytes object
# and that same object is queued on every receiving connection.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memchr, memcpy

HEARTBEAT = b":\n\n"


cdef inline Py_ssize_t _put(char* out, Py_ssize_t pos, const char* src, Py_ssize_t n) noexcept:
    memcpy(out + pos, src, n)
    return pos + n


cdef inline Py_ssize_t _next_break(const char* data, Py_ssize_t pos, Py_ssize_t end,
                                   bint has_cr) noexcept:
    # Index of the next CR or LF at or after pos, or end. Bodies without CR
    # (nearly all of them) are split with memchr, which is vectorized.
    cdef const char* hit
    if not has_cr:
        hit = <const char*>memchr(data + pos, b'\n', end - pos)
        return end if hit == NULL else hit - data
    while pos < end and data[pos] != b'\n' and data[pos] != b'\r':
        pos += 1
    return pos


cdef bytes _encode(const char* event, Py_ssize_t event_len,
                   const char* event_id, Py_ssize_t id_len,
                   const char* data, Py_ssize_t data_len):
    # Two passes over data: count the lines (CRLF, LF and CR all end one, as
    # the SSE spec reads them), then copy each behind its own "data: ".
    cdef bint has_cr = memchr(data, b'\r', data_len) != NULL
    cdef Py_ssize_t i = 0, lines = 1, seps = 0, size, pos = 0, brk
    while True:
        brk = _next_break(data, i, data_len, has_cr)
        if brk == data_len:
            break
        lines += 1
        seps += 1
        if data[brk] == b'\r' and brk + 1 < data_len and data[brk + 1] == b'\n':
            brk += 1
            seps += 1
        i = brk + 1
    # Each line becomes "data: " + line + "\n"; the separators are dropped.
    size = 7 + event_len + 1 + lines * 7 + (data_len - seps) + 1
    if event_id != NULL:
        size += 4 + id_len + 1
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, size)
    cdef char* out = PyBytes_AS_STRING(frame)
    pos = _put(out, pos, b"event: ", 7)
    pos = _put(out, pos, event, event_len)
    out[pos] = b'\n'
    pos += 1
    if event_id != NULL:
        pos = _put(out, pos, b"id: ", 4)
        pos = _put(out, pos, event_id, id_len)
        out[pos] = b'\n'
        pos += 1
    i = 0
    while True:
        brk = _next_break(data, i, data_len, has_cr)
        pos = _put(out, pos, b"data: ", 6)
        pos = _put(out, pos, data + i, brk - i)
        out[pos] = b'\n'
        pos += 1
        if brk == data_len:
            break
        if data[brk] == b'\r' and brk + 1 < data_len and data[brk + 1] == b'\n':
            brk += 1
        i = brk + 1
    out[pos] = b'\n'
    return frame


def encode_event(str topic, event_id, bytes data):
    """``event: topic`` / ``id: event_id`` / ``data: ...`` frame.

    ``event_id`` may be None (no ``id:`` line). The caller has validated the
    topic and id (no CR, LF or NUL).
    """
    cdef bytes t = topic.encode("utf-8")
    cdef bytes e
    if event_id is None:
        return _encode(t, len(t), NULL, 0, data, len(data))
    e = (<str>event_id).encode("utf-8")
    return _encode(t, len(t), e, len(e), data, len(data))


def encode_system(bytes payload):
    """A system frame: ``event: message`` / ``data: payload``."""
    return _encode(b"message", 7, NULL, 0, payload, len(payload))
