cdef bytes _encode(const char* event, Py_ssize_t event_len,
                   const char* event_id, Py_ssize_t id_len,
                   const char* data, Py_ssize_t data_len)
