# The connect fast path's parser: one `GET <events_path>?topic=T&topic=U...`
# read straight from the input buffer, with no Python callback per header.
#
# Like PublishParser it accepts a strict, narrow subset of HTTP/1.1 and
# declines the rest, which httptools then reads byte for byte. What it
# accepts, llhttp must read the same way and the slow path must answer the
# same way: a connect that asks for a new client and names its topics, with
# nothing in its head the events route reads. The subset:
#
#   GET SP <events_path>[?topic=<T>(&topic=<T>)*] SP HTTP/1.1 CRLF
#   (<name>:[SP/HTAB...]<value> CRLF)*  CRLF
#
# T is as in publish.pyx (printable ASCII without "&", "%", "+" and "#": the
# query needs no unquoting), not empty. A name is letters, digits and "-",
# and not one the events route or llhttp acts on: Origin (CORS),
# Last-Event-ID and Authorization (read by the route or the auth hook),
# Content-Length, Transfer-Encoding, Expect, Upgrade and Proxy-Connection (a
# body, an upgrade); Connection only as "keep-alive". A value is printable
# ASCII with inner spaces, not empty, with no trailing space. No other query
# field (an id, last_event_id, anything), no body, and the request must end
# the buffer: a connect split over reads, or followed by more bytes, goes to
# httptools.
#
# The slow path's limits (on_url, on_header) and its topic count are checked
# as it counts them; past one it declines, and the slow path answers the
# error.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.string cimport memcmp

cdef enum:
    # How the fast path takes a header name.
    NAME_IGNORED = 0  # nothing reads it on this route
    NAME_DECLINED  # the route or llhttp acts on it
    NAME_CONNECTION  # taken as "keep-alive" only


cdef inline bint _token_char(unsigned char c) noexcept:
    return ((c >= b'a' and c <= b'z') or (c >= b'A' and c <= b'Z')
            or (c >= b'0' and c <= b'9') or c == b'-')


cdef int _name_kind(const unsigned char* name, Py_ssize_t n) noexcept:
    if n == 6:
        if _lower_is(name, b"origin", 6) or _lower_is(name, b"expect", 6):
            return NAME_DECLINED
    elif n == 7:
        if _lower_is(name, b"upgrade", 7):
            return NAME_DECLINED
    elif n == 10:
        if _lower_is(name, b"connection", 10):
            return NAME_CONNECTION
    elif n == 13:
        if _lower_is(name, b"authorization", 13) or _lower_is(name, b"last-event-id", 13):
            return NAME_DECLINED
    elif n == 14:
        if _lower_is(name, b"content-length", 14):
            return NAME_DECLINED
    elif n == 16:
        if _lower_is(name, b"proxy-connection", 16):
            return NAME_DECLINED
    elif n == 17:
        if _lower_is(name, b"transfer-encoding", 17):
            return NAME_DECLINED
    return NAME_IGNORED


cdef class ConnectParser:
    """Reads one fast-path connect from a buffer (see gochan/_fast/core.pyi)."""

    def __init__(self, str events_path, Py_ssize_t max_url_bytes,
                 Py_ssize_t max_header_bytes, Py_ssize_t max_headers,
                 Py_ssize_t max_topics):
        self._prefix = b"GET " + events_path.encode("latin-1")
        self.max_url_bytes = max_url_bytes
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_topics = max_topics

    def parse(self, bytes data):
        return self._parse(data)

    cdef object _parse(self, bytes data):
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        cdef const unsigned char* buf = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef const unsigned char* p = buf
        cdef const unsigned char* end = buf + size
        cdef const unsigned char* q
        cdef const unsigned char* value
        cdef Py_ssize_t prefix_len = PyBytes_GET_SIZE(self._prefix)
        cdef Py_ssize_t name_len, value_len
        cdef Py_ssize_t header_bytes = 0, headers = 0
        cdef int kind
        cdef list topics = []

        # The request line.
        if size < prefix_len or memcmp(p, PyBytes_AS_STRING(self._prefix), prefix_len) != 0:
            return None
        p += prefix_len
        if p < end and p[0] == b'?':
            p += 1
            while True:
                if end - p < 6 or memcmp(p, b"topic=", 6) != 0:
                    return None
                p += 6
                q = p
                while q < end and _topic_char(q[0]):
                    q += 1
                if q == p or PyList_GET_SIZE(topics) >= self.max_topics:
                    return None
                topics.append(PyUnicode_DecodeLatin1(<const char*>p, q - p, NULL))
                p = q
                if p < end and p[0] == b'&':
                    p += 1
                    continue
                break
        # on_url counts the target: the path and its query.
        if p - buf - 4 > self.max_url_bytes:
            return None
        if end - p < 11 or memcmp(p, _VERSION, 11) != 0:
            return None
        p += 11

        # The header lines, up to the empty one, which must end the buffer.
        while True:
            if end - p < 2:
                return None
            if p[0] == b'\r':
                if p[1] != b'\n' or p + 2 != end:
                    return None
                return topics
            q = p
            while q < end and _token_char(q[0]):
                q += 1
            if q == end or q[0] != b':' or q == p:
                return None  # a space before ":", obs-fold, another byte
            name_len = q - p
            kind = _name_kind(p, name_len)
            if kind == NAME_DECLINED:
                return None
            value = _value_start(q + 1, end)
            q = _printable_end(value, end)
            if end - q < 2 or q[0] != b'\r' or q[1] != b'\n':
                return None  # a tab, a control byte, a bare CR or LF, non-ASCII, the end
            value_len = q - value
            if value_len == 0 or value[value_len - 1] == b' ':
                return None
            if kind == NAME_CONNECTION and (
                value_len != 10 or not _lower_is(value, b"keep-alive", 10)
            ):
                return None
            header_bytes += name_len + value_len + 4
            headers += 1
            if header_bytes > self.max_header_bytes or headers > self.max_headers:
                return None
            p = q + 2
