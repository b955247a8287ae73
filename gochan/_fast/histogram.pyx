# Observations counted in fixed buckets, for /metrics.
#
# An observation is a binary search over a few C doubles and two additions:
# cheap enough to make once per message on the fan-out path. Nothing is
# cumulated or formatted until a scrape asks (Histogram.snapshot).

from libc.math cimport isfinite


cdef class Histogram:
    """Counts of observations in fixed buckets, read by a /metrics collector."""

    def __cinit__(self, bounds not None):
        cdef Py_ssize_t i
        cdef double bound
        bounds = tuple(bounds)
        if not 0 < len(bounds) <= MAX_BUCKETS:
            raise ValueError(f"a histogram has 1 to {MAX_BUCKETS} bucket bounds")
        for i, value in enumerate(bounds):
            bound = value
            if not isfinite(bound):
                raise ValueError("bucket bounds must be finite (+Inf is always the last bucket)")
            if i and bound <= self._bounds[i - 1]:
                raise ValueError("bucket bounds must increase")
            self._bounds[i] = bound
        self.nbounds = len(bounds)
        for i in range(MAX_BUCKETS + 1):
            self._counts[i] = 0
        self.sum = 0.0
        self.count = 0

    cdef void observe(self, double value) noexcept:
        # The first bucket whose bound is >= value (buckets are `le`).
        cdef Py_ssize_t lo = 0, hi = self.nbounds, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if value <= self._bounds[mid]:
                hi = mid
            else:
                lo = mid + 1
        self._counts[lo] += 1
        self.sum += value
        self.count += 1

    def record(self, double value):
        """Count one observation of ``value``."""
        self.observe(value)

    @property
    def bounds(self):
        """The upper bounds of the buckets, without the implicit +Inf."""
        return tuple([self._bounds[i] for i in range(self.nbounds)])

    def snapshot(self):
        """``(bounds, cumulative counts, sum)``: one count per bound, then
        the +Inf bucket, which is the number of observations."""
        cdef Py_ssize_t i
        cdef unsigned long long running = 0
        cumulative = []
        for i in range(self.nbounds + 1):
            running += self._counts[i]
            cumulative.append(running)
        return self.bounds, cumulative, self.sum
