# The publish fast path's parser: one pipelined `POST <path>?topic=T` read
# straight from the input buffer, with no Python callback per header.
#
# It accepts a strict, narrow subset of HTTP/1.1 and nothing else: for any
# byte it is not sure about it declines, and the protocol hands the input,
# byte for byte, to httptools. So it never has to agree with llhttp on an
# odd case: it only has to be sure that what it accepts, llhttp would read
# the same way (same target, same header values as on_header reports them,
# same body). The subset:
#
#   POST SP <publish_path>?topic=<T> SP HTTP/1.1 CRLF
#   (<name>:[SP/HTAB...]<value> CRLF)*  CRLF  <body: exactly Content-Length>
#
# T is printable ASCII without "&", "%", "+" (routes.py's _read_publish takes
# such a query as the topic with no unquoting) and "#" (a fragment). A name is
# one of _NAMES below (any case), at most once; Content-Length must be there,
# digits only. A value is printable ASCII with inner spaces, not empty, with
# no trailing space or tab (llhttp keeps those; the slow path can have them).
# No Transfer-Encoding, Expect, Upgrade, obs-fold, bare CR or LF, NUL.
#
# Limits are checked as the slow path counts them (protocol.py: on_url,
# on_header, on_headers_complete), and past one it declines: the slow path
# then refuses the request with its own error.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.string cimport memcmp

PUBLISH_INCOMPLETE = PUBLISH_INCOMPLETE_
PUBLISH_DECLINED = PUBLISH_DECLINED_

cdef enum:
    H_HOST = 0
    H_CONTENT_LENGTH
    H_CONTENT_TYPE
    H_AUTHORIZATION
    H_ORIGIN
    H_CONNECTION
    H_USER_AGENT
    H_ACCEPT
    H_ACCEPT_ENCODING


cdef inline bint _name_char(unsigned char c) noexcept:
    # Every accepted name is letters and "-": anything else ends the name.
    return (c >= b'a' and c <= b'z') or (c >= b'A' and c <= b'Z') or c == b'-'


cdef inline int _expect(const unsigned char* p, Py_ssize_t avail,
                        const char* want, Py_ssize_t n) noexcept:
    # 1: the n bytes are there; 0: fewer are, and they match so far; -1: no.
    if avail >= n:
        return 1 if memcmp(p, want, n) == 0 else -1
    return 0 if memcmp(p, want, avail) == 0 else -1


cdef int _header_id(const unsigned char* name, Py_ssize_t n) noexcept:
    if n == 4:
        return H_HOST if _lower_is(name, b"host", 4) else -1
    if n == 6:
        if _lower_is(name, b"origin", 6):
            return H_ORIGIN
        return H_ACCEPT if _lower_is(name, b"accept", 6) else -1
    if n == 10:
        if _lower_is(name, b"connection", 10):
            return H_CONNECTION
        return H_USER_AGENT if _lower_is(name, b"user-agent", 10) else -1
    if n == 12:
        return H_CONTENT_TYPE if _lower_is(name, b"content-type", 12) else -1
    if n == 13:
        return H_AUTHORIZATION if _lower_is(name, b"authorization", 13) else -1
    if n == 14:
        return H_CONTENT_LENGTH if _lower_is(name, b"content-length", 14) else -1
    if n == 15:
        return H_ACCEPT_ENCODING if _lower_is(name, b"accept-encoding", 15) else -1
    return -1


cdef class PublishParser:
    """Reads one fast-path publish from a buffer (see gochan/_fast/core.pyi)."""

    def __init__(self, str publish_path, Py_ssize_t max_url_bytes,
                 Py_ssize_t max_header_bytes, Py_ssize_t max_headers,
                 Py_ssize_t max_body_bytes):
        cdef bytes path = publish_path.encode("latin-1")
        self._prefix = b"POST " + path + b"?topic="
        self._path_len = len(path)
        self.max_url_bytes = max_url_bytes
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_body_bytes = max_body_bytes
        self._host_raw = b""
        self._host = ""

    def parse(self, bytes data, Py_ssize_t pos=0):
        return self._parse(data, pos)

    cdef str _host_of(self, const unsigned char* value, Py_ssize_t size):
        cdef bytes raw = self._host_raw
        if size == PyBytes_GET_SIZE(raw) and memcmp(PyBytes_AS_STRING(raw), value, size) == 0:
            return self._host
        self._host_raw = PyBytes_FromStringAndSize(<const char*>value, size)
        self._host = PyUnicode_DecodeLatin1(<const char*>value, size, NULL)
        return self._host

    cdef object _parse(self, bytes data, Py_ssize_t pos):
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        if pos < 0 or pos >= size:
            return PUBLISH_INCOMPLETE_
        cdef const unsigned char* buf = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef const unsigned char* p = buf + pos
        cdef const unsigned char* end = buf + size
        cdef const unsigned char* q
        cdef const unsigned char* value
        cdef const unsigned char* topic
        cdef const unsigned char* host = NULL
        cdef const unsigned char* origin = NULL
        cdef const unsigned char* auth = NULL
        cdef Py_ssize_t prefix_len = PyBytes_GET_SIZE(self._prefix)
        cdef Py_ssize_t topic_len, name_len, value_len, i
        cdef Py_ssize_t host_len = 0, origin_len = 0, auth_len = 0
        cdef Py_ssize_t header_bytes = 0, headers = 0
        cdef long long length = -1
        cdef unsigned int seen = 0, digit
        cdef int hid, got

        # The request line.
        got = _expect(p, end - p, PyBytes_AS_STRING(self._prefix), prefix_len)
        if got <= 0:
            return PUBLISH_DECLINED_ if got < 0 else PUBLISH_INCOMPLETE_
        topic = p + prefix_len
        q = topic
        while q < end and _topic_char(q[0]):
            q += 1
        topic_len = q - topic
        # on_url counts the target: path, "?topic=" and the topic.
        if self._path_len + 7 + topic_len > self.max_url_bytes:
            return PUBLISH_DECLINED_
        if q == end:
            return PUBLISH_INCOMPLETE_
        if topic_len == 0:
            return PUBLISH_DECLINED_
        got = _expect(q, end - q, _VERSION, 11)
        if got <= 0:
            return PUBLISH_DECLINED_ if got < 0 else PUBLISH_INCOMPLETE_
        p = q + 11

        # The header lines, up to the empty one.
        while True:
            if p >= end:
                return PUBLISH_INCOMPLETE_
            if p[0] == b'\r':
                if p + 1 >= end:
                    return PUBLISH_INCOMPLETE_
                if p[1] != b'\n':
                    return PUBLISH_DECLINED_
                p += 2
                break
            q = p
            while q < end and _name_char(q[0]):
                q += 1
            if q == end:
                return PUBLISH_INCOMPLETE_
            if q[0] != b':':
                return PUBLISH_DECLINED_  # a space before ":", obs-fold, another byte
            name_len = q - p
            hid = _header_id(p, name_len)
            if hid < 0 or (seen >> hid) & 1:
                return PUBLISH_DECLINED_  # a name not in the subset, or repeated
            seen |= 1u << hid
            value = _value_start(q + 1, end)
            q = _printable_end(value, end)
            if q == end or (q[0] == b'\r' and q + 1 == end):
                return PUBLISH_INCOMPLETE_
            if q[0] != b'\r' or q[1] != b'\n':
                return PUBLISH_DECLINED_  # a tab, a control byte, a bare CR or LF, non-ASCII
            value_len = q - value
            if value_len == 0 or value[value_len - 1] == b' ':
                return PUBLISH_DECLINED_
            header_bytes += name_len + value_len + 4
            headers += 1
            if header_bytes > self.max_header_bytes or headers > self.max_headers:
                return PUBLISH_DECLINED_
            if hid == H_HOST:
                host = value
                host_len = value_len
            elif hid == H_CONTENT_LENGTH:
                if value_len > PUBLISH_MAX_LENGTH_DIGITS:
                    return PUBLISH_DECLINED_
                length = 0
                for i in range(value_len):
                    digit = value[i] - 48  # b'0'
                    if digit > 9:  # unsigned: below "0" wraps past 9 too
                        return PUBLISH_DECLINED_
                    length = length * 10 + digit
                if length > self.max_body_bytes:
                    return PUBLISH_DECLINED_
            elif hid == H_AUTHORIZATION:
                auth = value
                auth_len = value_len
            elif hid == H_ORIGIN:
                origin = value
                origin_len = value_len
            elif hid == H_CONNECTION:
                if value_len != 10 or not _lower_is(value, b"keep-alive", 10):
                    return PUBLISH_DECLINED_
            p = q + 2

        if length < 0:
            return PUBLISH_DECLINED_  # no Content-Length
        if end - p < length:
            return PUBLISH_INCOMPLETE_
        return (
            p + length - buf,
            PyUnicode_DecodeLatin1(<const char*>topic, topic_len, NULL),
            PyBytes_FromStringAndSize(<const char*>p, length),
            self._host_of(host, host_len) if host != NULL else "",
            PyUnicode_DecodeLatin1(<const char*>origin, origin_len, NULL) if origin != NULL else None,
            PyUnicode_DecodeLatin1(<const char*>auth, auth_len, NULL) if auth != NULL else None,
        )
