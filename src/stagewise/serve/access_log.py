"""The serve access log's line: uvicorn's, with the request's path only. A query string is
left out because a client may put anything there (`?patient=DOE_JOHN_MRN0042`), and the log
is kept where the server runs. Named by `server.log_config`, imported when uvicorn starts."""

from __future__ import annotations

import copy
import logging

from uvicorn.logging import AccessFormatter


class PathOnlyAccessFormatter(AccessFormatter):
    """uvicorn's access line with what follows '?' left out."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if isinstance(record.args, tuple) and len(record.args) == 5:
            record = copy.copy(record)
            client, method, full_path, version, status = record.args
            record.args = (client, method, str(full_path).split("?", 1)[0], version, status)
        return super().formatMessage(record)
