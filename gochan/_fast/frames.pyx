# SSE frame encoding. A frame is built once per message as one bytes object
# and that same object is queued on every receiving connection.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy

HEARTBEAT = b":\n\n"


cdef inline Py_ssize_t _put(char* out, Py_ssize_t pos, const char* src, Py_ssize_t n) noexcept:
    memcpy(out + pos, src, n)
    return pos + n


cdef bytes _encode(const char* event, Py_ssize_t event_len,
                   const char* event_id, Py_ssize_t id_len,
                   const char* data, Py_ssize_t data_len):
    # Two passes over data: count the lines (CRLF, LF and CR all end one, as
    # the SSE spec reads them), then copy each behind its own "data: ".
    cdef Py_ssize_t i = 0, lines = 1, seps = 0, size, pos = 0, start
    cdef char c
    while i < data_len:
        c = data[i]
        if c == b'\r':
            lines += 1
            seps += 1
            if i + 1 < data_len and data[i + 1] == b'\n':
                i += 1
                seps += 1
        elif c == b'\n':
            lines += 1
            seps += 1
        i += 1
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
    start = 0
    i = 0
    while True:
        if i == data_len or data[i] == b'\r' or data[i] == b'\n':
            pos = _put(out, pos, b"data: ", 6)
            pos = _put(out, pos, data + start, i - start)
            out[pos] = b'\n'
            pos += 1
            if i == data_len:
                break
            if data[i] == b'\r' and i + 1 < data_len and data[i + 1] == b'\n':
                i += 1
            start = i + 1
        i += 1
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
