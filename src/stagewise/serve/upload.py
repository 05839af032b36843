"""One uploaded file, read from a multipart request into memory: never spooled to disk.

Starlette's `request.form()` spools any file part over 1 MiB to a temporary file; here the
request body is streamed through python-multipart's parser instead, the `file` part kept in
a bytearray and its size checked while it arrives, so an oversized upload is refused without
being held whole, and no byte of an image ever reaches the disk. Of the part's file name only
the extension is kept (it chooses the reader, as a path's does); the name itself is dropped.
"""

from __future__ import annotations

import contextlib

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from stagewise.serve.refusals import Problem

# Room for the multipart framing (boundaries, part headers) beyond the file's own bytes.
_FRAMING = 64 * 1024
# An oversized body is read to its end (and thrown away) up to this many times the limit,
# so that an ordinary client gets its 413 answer instead of a broken connection; a body
# declared larger than that is refused before any of it is read.
_DRAIN_FACTOR = 4
FIELD = "file"
# An upload that sends nothing for this long is answered 408 and dropped: a client that opens
# uploads and stalls (a broken link, or many on purpose) must not hold connections forever.
UPLOAD_TIMEOUT_S = 30.0
# The extensions kept from an upload's file name (longest first); any other name becomes "upload".
KNOWN_SUFFIXES = (".nii.gz", ".dicom", ".jpeg", ".tiff", ".png", ".jpg", ".dcm", ".nii", ".bmp", ".tif")


def _too_large(limit: int) -> Problem:
    return Problem(413, "too_large", f"The file is larger than the {limit / 2**20:g} MB this server accepts. "
                                     "Export a smaller image, or start the server with a larger --max-upload-mb.")


class _Part:
    def __init__(self, limit: int):
        self.limit = limit
        self.headers: dict[bytes, bytes] = {}
        self.field = b""
        self.value = b""
        self.data: bytearray | None = None  # the file part's content
        self.current: bytearray | None = None  # where the part being parsed goes (None: dropped)
        self.suffix = ""
        self.overflow = False
        self.seen = False

    # python-multipart callbacks
    def on_part_begin(self) -> None:
        self.headers, self.field, self.value = {}, b"", b""
        self.current = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.field.lower()] = self.value
        self.field, self.value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        if options.get(b"name") == FIELD.encode() and not self.seen:
            self.seen = True
            self.data = bytearray()
            self.current = self.data
            # a known extension only: the name itself is never kept
            name = options.get(b"filename", b"").decode("utf-8", "replace").strip().lower()
            self.suffix = next((s for s in KNOWN_SUFFIXES if name.endswith(s)), "")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.current is None or self.overflow:
            return
        if len(self.current) + (end - start) > self.limit:
            self.overflow = True
            self.current.clear()
            return
        self.current += data[start:end]

    def on_part_end(self) -> None:
        self.current = None


async def read_upload(request: Request, limit: int, idle_s: float = UPLOAD_TIMEOUT_S) -> tuple[bytes, str]:
    """(content, name) of the multipart field `file`; `name` is "upload" plus the original
    extension. Problems (not multipart, no file, too large, malformed, nothing received for
    `idle_s` seconds) raise `Problem`."""
    mime, options = parse_options_header(request.headers.get("content-type", ""))
    if mime != b"multipart/form-data" or not options.get(b"boundary"):
        raise Problem(415, "not_multipart", f"Send the image as multipart/form-data, in the form field '{FIELD}'.")
    body_limit = limit + _FRAMING
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > body_limit:
        if int(declared) <= _DRAIN_FACTOR * body_limit:
            with contextlib.suppress(TimeoutError):  # a stalled body is not waited for: the answer is the same
                await _drain_stream(_with_idle_timeout(request.stream(), idle_s), _DRAIN_FACTOR * body_limit)
        raise _too_large(limit)
    part = _Part(limit)
    parser = MultipartParser(options[b"boundary"], {
        "on_part_begin": part.on_part_begin, "on_header_field": part.on_header_field,
        "on_header_value": part.on_header_value, "on_header_end": part.on_header_end,
        "on_headers_finished": part.on_headers_finished, "on_part_data": part.on_part_data,
        "on_part_end": part.on_part_end,
    })
    total = 0
    stream = _with_idle_timeout(request.stream(), idle_s)
    try:
        async for chunk in stream:
            total += len(chunk)
            if total > body_limit or part.overflow:
                await _drain_stream(stream, _DRAIN_FACTOR * body_limit - total)
                raise _too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError:
        raise Problem(400, "bad_request", f"The upload is not a well-formed multipart form; send the image in the "
                                          f"form field '{FIELD}'.") from None
    except ClientDisconnect:
        raise Problem(400, "bad_request", "The upload was interrupted before it was complete.") from None
    except TimeoutError:
        raise Problem(408, "upload_timeout", f"The upload stalled: nothing arrived for {idle_s:g} seconds. Send the "
                                             "file again.") from None
    if part.overflow:
        raise _too_large(limit)
    if part.data is None:
        raise Problem(400, "missing_file", f"No file was sent: put the image in the form field '{FIELD}'.")
    if not part.data:
        raise Problem(400, "empty_file", "The file is empty (0 bytes); it may be an interrupted copy or download.")
    return bytes(part.data), "upload" + part.suffix


async def _drain_stream(stream, left: int) -> None:
    """Read and drop what is left of the body, at most `left` more bytes."""
    try:
        async for chunk in stream:
            left -= len(chunk)
            if left < 0:
                return
    except ClientDisconnect:
        return


async def _with_idle_timeout(stream, idle_s: float):
    """The body's chunks; TimeoutError when the next one takes longer than `idle_s` seconds."""
    while True:
        try:
            with anyio.fail_after(idle_s):
                chunk = await stream.__anext__()
        except StopAsyncIteration:
            return
        yield chunk
