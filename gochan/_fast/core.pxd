include "consts.pxi"
include "frames.pxd"
include "histogram.pxd"
include "hub.pxd"
