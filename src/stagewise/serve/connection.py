"""A connection that must finish its request headers in time.

uvicorn closes an idle connection between requests (`timeout_keep_alive`) and the upload
reader (upload.py) drops a body that stalls, but once a client has sent its first byte
uvicorn waits for the rest of the headers for ever: a few slow clients that each send
half a request line would hold the bedside server's connections open (the "slowloris"
pattern). This protocol is uvicorn's own h11 one with one deadline added: the headers of
each request must be complete within `seconds` of the connection opening (or of the
previous response), otherwise the connection is closed.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def header_deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's `http=` protocol class with a header deadline of `seconds`."""

    class HeaderDeadlineProtocol(H11Protocol):
        deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.start_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request's headers have arrived
                self.stop_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.start_deadline()  # the next request on a kept-alive connection gets its own

        def connection_lost(self, exc) -> None:
            self.stop_deadline()
            super().connection_lost(exc)

        def start_deadline(self) -> None:
            self.stop_deadline()
            self.deadline = self.loop.call_later(seconds, self.headers_overdue)

        def stop_deadline(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def headers_overdue(self) -> None:
            self.deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol
