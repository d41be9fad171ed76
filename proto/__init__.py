"""Diptych's wire protocol: typed messages (``proto.messages``) and their one codec (``proto.codec``).

See ``proto/README.md`` for the sockets and who sends what to whom, and for the limits every decoded message is held
to (``proto.validation``, imported here so that every decoder applies them).
"""

from diptych.proto.codec import PROTOCOL_VERSION, ProtocolError, ProtocolVersionError, decode, encode
from diptych.proto.messages import *  # noqa: F403  (the message types are this package's API)
from diptych.proto.validation import check_message

__all__ = ["PROTOCOL_VERSION", "ProtocolError", "ProtocolVersionError", "check_message", "decode", "encode"]
