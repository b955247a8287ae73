# cython: language_level=3
# The fan-out core: one extension module built from several files, the way
# asyncpg's protocol.pyx is. Declarations live in the matching .pxd files.

include "frames.pyx"
include "histogram.pyx"
include "hub.pyx"
include "scan.pyx"
include "publish.pyx"
include "connect.pyx"
