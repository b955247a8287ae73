cdef class ConnectParser:
    # b"GET " + events_path: every request the fast path takes starts with
    # exactly these bytes.
    cdef bytes _prefix
    cdef readonly Py_ssize_t max_url_bytes, max_header_bytes, max_headers, max_topics

    cdef object _parse(self, bytes data)
