cdef class Histogram:
    # Upper bounds of the buckets (Prometheus's `le`), increasing; the last
    # count is the +Inf bucket. Counts are per bucket, not cumulative.
    cdef double _bounds[MAX_BUCKETS]
    cdef unsigned long long _counts[MAX_BUCKETS + 1]
    cdef Py_ssize_t nbounds
    cdef readonly double sum
    cdef readonly unsigned long long count

    cdef void observe(self, double value) noexcept
