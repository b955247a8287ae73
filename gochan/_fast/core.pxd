include "consts.pxi"
include "frames.pxd"
include "hub.pxd"
