"""gochan's named loggers.

``gochan.server`` for the HTTP side, ``gochan.access`` for one line per
request, ``gochan.broker`` for drivers, ``gochan`` for the streamer.
"""

import logging

logger = logging.getLogger("gochan")
server_logger = logging.getLogger("gochan.server")
access_logger = logging.getLogger("gochan.access")
broker_logger = logging.getLogger("gochan.broker")
