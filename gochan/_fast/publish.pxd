cdef class PublishParser:
    # b"POST " + publish_path + b"?topic=": every request the fast path takes
    # starts with exactly these bytes.
    cdef bytes _prefix
    cdef Py_ssize_t _path_len
    cdef readonly Py_ssize_t max_url_bytes, max_header_bytes, max_headers, max_body_bytes
    # The last Host value read and its text: publishers send the same Host on
    # every request, so the str (and its cached hash) is reused.
    cdef bytes _host_raw
    cdef str _host

    cdef object _parse(self, bytes data, Py_ssize_t pos)
    cdef str _host_of(self, const unsigned char* value, Py_ssize_t size)
