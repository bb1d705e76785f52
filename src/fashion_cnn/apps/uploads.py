"""Multipart uploads read as they arrive, straight into a private folder, within limits.

`serve` needs each uploaded image as a file, so that predict's file-based guards apply
(data.images.open_image: special files refused, the pixel budget checked from the header
before decoding). The body is parsed as a stream with python-multipart's parser (the one
Starlette uses), so that the limits hold while bytes arrive, not after the whole body has been
buffered:

- the body as a whole: at most `max_body_bytes` (the request is refused, reading stops);
- each file: at most `max_file_bytes` (that file is refused, its remaining bytes are counted
  and dropped, the other files are kept);
- at most `max_files` files and a few short text fields with known names;
- a file name must be one plain name (no path separator, no control character, at most
  255 bytes of UTF-8) and a file's declared type an image type or a generic one.

A problem with the request as a whole raises RequestRejected (an HTTP status and one line); a
problem with one file is recorded on its Upload (`error`, `status`), so the caller can answer
for the other files.

>>> form = await read_multipart(content_type, request.stream(), folder,  # doctest: +SKIP
...                             max_files=16, max_file_bytes=10 << 20,
...                             max_body_bytes=170 << 20, fields={"top_k"})
>>> [(u.name, u.size, u.error) for u in form.uploads]                     # doctest: +SKIP
[('shirt.jpg', 48213, None)]
"""

from __future__ import annotations

import unicodedata
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import first_line

try:  # python-multipart's import name from 0.0.13; `multipart` before that
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # pragma: no cover - older python-multipart
    from multipart.exceptions import FormParserError
    from multipart.multipart import MultipartParser, parse_options_header

# A file name of more bytes than this is longer than any file system allows (ext4, NTFS, APFS).
MAX_NAME_BYTES = 255
# A part's headers (Content-Disposition with the file name, Content-Type) take a few hundred
# bytes; more is not a browser's or curl's upload.
MAX_PART_HEADER_BYTES = 8 * 1024
# The text fields are short settings (top_k=5, explain=true).
MAX_FIELD_BYTES = 1024
MAX_FIELDS = 16
# Accepted declared types: any image type, and the types a client sends when it does not know
# (curl and browsers send application/octet-stream for an unknown extension). What the bytes
# are is decided by decoding them, not by this header.
GENERIC_TYPES = ("application/octet-stream", "binary/octet-stream")
# Characters that change how a name is displayed without being visible: the bidirectional
# overrides and isolates (a "photo<U+202E>gpj.exe" shows as "photoexe.jpg").
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")

STATUS_BAD_REQUEST = 400
STATUS_TOO_LARGE = 413
STATUS_UNSUPPORTED_TYPE = 415
STATUS_UNPROCESSABLE = 422


class RequestRejected(Exception):
    """The request as a whole cannot be used: an HTTP status and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """One uploaded file: where its bytes are, or why it was refused."""

    index: int                   # its position among the request's files, from 0
    name: str                    # the client's file name, or "file <index + 1>" where unusable
    path: Path | None = None     # its bytes, in the request's folder; None once refused
    size: int = 0                # bytes received (counted on, past the limit, until it ends)
    content_type: str = ""
    error: str | None = None     # one line naming the file and the problem
    status: int = 200            # the HTTP status that error stands for


@dataclass
class Form:
    uploads: list[Upload] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)


def shown_name(text: str, limit: int = 60) -> str:
    """A client's name as one printable line for a message: escaped, shortened to `limit`."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


def check_file_name(raw: bytes) -> str | None:
    """Why `raw` (a multipart filename, as sent) is not one plain file name, or None."""
    if len(raw) > MAX_NAME_BYTES:
        return f"its name is {len(raw)} bytes long (at most {MAX_NAME_BYTES})"
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "its name is not UTF-8 text"
    if "/" in name or "\\" in name:
        return "its name contains a path separator (/ or \\); send the file's name alone"
    if name in (".", ".."):
        return "its name is . or .., not a file name"
    if any(unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS for c in name):
        return "its name contains a control character (a newline, tab, NUL or direction mark)"
    return None


def check_content_type(content_type: str) -> str | None:
    """Why a part's declared Content-Type is not acceptable for an image, or None."""
    if not content_type or content_type.startswith("image/") or content_type in GENERIC_TYPES:
        return None
    return (f"its content type is {shown_name(content_type, 80)}, not an image type (send "
            f"image/png, image/jpeg, ... or application/octet-stream)")


class _Reader:
    """python-multipart's callbacks: parts become Uploads (written into `folder`) or fields."""

    def __init__(self, folder: Path, max_files: int, max_file_bytes: int,
                 fields: Collection[str]):
        self.folder, self.max_files, self.max_file_bytes = folder, max_files, max_file_bytes
        self.known_fields = set(fields)
        self.form = Form()
        self.ended = False
        self._in_part = False
        self._header_name = self._header_value = b""
        self._header_bytes = 0
        self._headers: dict[bytes, bytes] = {}
        self._upload: Upload | None = None
        self._unnamed = False  # the current file part came with an empty filename
        self._handle = None
        self._field_name: str | None = None
        self._field_value = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_end": self.on_end}

    def on_part_begin(self) -> None:
        self._in_part = True
        self._headers, self._header_bytes = {}, 0
        self._upload, self._field_name = None, None
        self._field_value = bytearray()

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise RequestRejected(STATUS_BAD_REQUEST, f"a multipart part's headers are longer "
                                  f"than {MAX_PART_HEADER_BYTES // 1024} KiB")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise RequestRejected(STATUS_BAD_REQUEST, "a multipart part has no "
                                  "Content-Disposition name; send form-data fields")
        if b"filename" in options:
            self._begin_file(options[b"filename"])
        else:
            self._begin_field(options[b"name"])

    def _begin_field(self, raw_name: bytes) -> None:
        name = raw_name.decode("utf-8", "replace")
        if name not in self.known_fields:
            known = ", ".join(sorted(self.known_fields)) or "none"
            raise RequestRejected(STATUS_BAD_REQUEST, f"unknown form field "
                                  f"{shown_name(name)!r} (known: {known}; images are sent as "
                                  f"file fields, e.g. curl -F file=@shirt.jpg)")
        if name in self.form.fields or len(self.form.fields) >= MAX_FIELDS:
            raise RequestRejected(STATUS_BAD_REQUEST, f"form field {name!r} given twice")
        self._field_name = name

    def _begin_file(self, raw_name: bytes) -> None:
        uploads = self.form.uploads
        if len(uploads) >= self.max_files:
            raise RequestRejected(STATUS_TOO_LARGE, f"more than {self.max_files} files in one "
                                  f"request; send them in several")
        index = len(uploads)
        upload = Upload(index, f"file {index + 1}")
        self._unnamed = not raw_name
        problem = check_file_name(raw_name)
        if problem is None:
            upload.name = raw_name.decode("utf-8") or upload.name
        else:
            shown = shown_name(raw_name.decode("utf-8", "replace"))
            upload.error = f"{upload.name} ({shown}): {problem}"
            upload.status = STATUS_BAD_REQUEST
        content_type, _ = parse_options_header(self._headers.get(b"content-type", b""))
        upload.content_type = content_type.decode("latin-1")
        problem = check_content_type(upload.content_type)
        if upload.error is None and problem is not None:
            upload.error, upload.status = f"{upload.name}: {problem}", STATUS_UNSUPPORTED_TYPE
        if upload.error is None:
            # "x": created here, never an existing file; the folder is the request's own
            upload.path = self.folder / f"upload-{index:03d}"
            self._handle = open(upload.path, "xb")
        uploads.append(upload)
        self._upload = upload

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        size = end - start
        if self._upload is None:
            if len(self._field_value) + size > MAX_FIELD_BYTES:
                raise RequestRejected(STATUS_BAD_REQUEST, f"form field {self._field_name!r} is "
                                      f"longer than {MAX_FIELD_BYTES} bytes")
            self._field_value += data[start:end]
            return
        upload = self._upload
        upload.size += size
        if self._handle is None:
            return  # refused: counted, not kept
        if upload.size > self.max_file_bytes:
            self._drop(upload)
            upload.error = (f"{upload.name}: larger than the limit of "
                            f"{describe_bytes(self.max_file_bytes)} per file")
            upload.status = STATUS_TOO_LARGE
            return
        # A plain write in the event loop: parts arrive in chunks of tens of KiB, a write of
        # that size into the page cache takes microseconds.
        self._handle.write(data[start:end])

    def _drop(self, upload: Upload) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if upload.path is not None:
            upload.path.unlink(missing_ok=True)
            upload.path = None

    def on_part_end(self) -> None:
        self._in_part = False
        upload = self._upload
        if upload is None:
            if self._field_name is not None:
                self.form.fields[self._field_name] = self._field_value.decode("utf-8", "replace")
            return
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if upload.size == 0 and upload.error is None:
            if self._unnamed:  # a form's file input left empty: no file, not an empty one
                self.form.uploads.pop()
                self._drop(upload)
                return
            self._drop(upload)
            upload.error = f"{upload.name}: empty file (0 bytes)"
            upload.status = STATUS_UNPROCESSABLE
        self._upload = None

    def on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        """Close a file left open by a body that ended inside a part."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def describe_bytes(count: int) -> str:
    """A byte count for a message: in GiB or MiB from 1 MiB up (one decimal where not whole),
    whole KiB, else bytes: '10 MiB', '161.1 MiB', '64 KiB', '1500 bytes'."""
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if count >= 1 << shift:
            whole = count % (1 << shift) == 0
            return f"{count >> shift} {unit}" if whole else f"{count / (1 << shift):.1f} {unit}"
    if count >= 1 << 10 and count % (1 << 10) == 0:
        return f"{count >> 10} KiB"
    return f"{count} bytes"


async def read_multipart(content_type: str | None, chunks: AsyncIterator[bytes], folder: Path,
                         *, max_files: int, max_file_bytes: int, max_body_bytes: int,
                         fields: Collection[str] = ()) -> Form:
    """A multipart/form-data body, read chunk by chunk from `chunks`: its files written into
    `folder` (which the caller owns and removes), its text fields (only those named in
    `fields`) as strings. RequestRejected for a request that cannot be used as a whole: not
    multipart (415), malformed or ending early (400), larger than `max_body_bytes` or with
    more than `max_files` files (413). A file that cannot be used gets its Upload's `error`.
    """
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        shown = shown_name(kind.decode("latin-1"), 80) or "none"
        raise RequestRejected(STATUS_UNSUPPORTED_TYPE, f"the request's content type is "
                              f"{shown}; send the images as multipart/form-data (curl -F "
                              f"file=@shirt.jpg)")
    boundary = options.get(b"boundary")
    if not boundary:
        raise RequestRejected(STATUS_BAD_REQUEST, "the multipart content type has no boundary")
    reader = _Reader(folder, max_files, max_file_bytes, fields)
    try:
        parser = MultipartParser(boundary, reader.callbacks())
        received = 0
        async for chunk in chunks:
            received += len(chunk)
            if received > max_body_bytes:
                raise RequestRejected(STATUS_TOO_LARGE, f"the request body is larger than "
                                      f"{describe_bytes(max_body_bytes)} ({max_files} files "
                                      f"of {describe_bytes(max_file_bytes)} at most)")
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise RequestRejected(STATUS_BAD_REQUEST,
                              f"malformed multipart body ({first_line(exc)})") from None
    finally:
        reader.close()
    if not reader.ended:
        raise RequestRejected(STATUS_BAD_REQUEST, "the multipart body ends before its closing "
                              "boundary (an interrupted upload?)")
    return reader.form
