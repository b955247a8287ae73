# Sizes of the growable C arrays. Small first sizes keep an idle connection
# cheap (most browsers hold ~10 topics); arrays double when full.
cdef enum:
    TOPIC_INITIAL_SLOTS = 4
    MEMBER_INITIAL_SLOTS = 4
    QUEUE_INITIAL_SLOTS = 4
    # A queue array larger than this is freed after a flush instead of kept,
    # so one burst does not pin memory on an otherwise idle connection.
    QUEUE_KEEP_SLOTS = 16
    # Frames gathered into one writev(); a longer queue is joined first.
    MAX_IOV = 64
    # Bucket bounds a Histogram can hold (+Inf comes on top).
    MAX_BUCKETS = 32
    # Messages timed between two flushes (publish-to-write latency); more in
    # one loop iteration go untimed rather than growing the array further.
    MAX_TIMED_MESSAGES = 65536
    TIMED_INITIAL_SLOTS = 64
    OPEN_INITIAL_SLOTS = 64
    # What PublishParser.parse answers when it gives no request: the bytes
    # so far may still become one (wait for more), or they never will (the
    # general parser must read them).
    PUBLISH_INCOMPLETE_ = -1
    PUBLISH_DECLINED_ = -2
    # Content-Length digits the fast path reads (more: declined, llhttp decides).
    PUBLISH_MAX_LENGTH_DIGITS = 15
