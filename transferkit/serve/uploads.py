"""Image uploads from a multipart request, every limit enforced while the bytes arrive.

A server that reads the whole body before checking it can be made to buffer gigabytes; one that stops reading
the moment a limit is crossed leaves the client writing into a closed socket and seeing a reset instead of the
answer. So: each part is checked as it streams in, nothing more is stored once a limit is crossed, and the rest
of the body (up to the request cap) is drained so the client gets a clean 413/415 JSON answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from transferkit.data.images import decode_rgb
from transferkit.errors import UnreadableImage

FIELD = "files"
MB = 2**20


@dataclass(frozen=True)
class Limits:
    """What one request may carry. The pixel limit is well under Pillow's 89 MP: a server decodes many at once."""

    max_file_bytes: int = 10 * MB
    max_files: int = 32
    max_request_bytes: int = 100 * MB
    max_pixels: int = 40_000_000


class UploadError(Exception):
    """A refused request: the HTTP status and the one-line reason the client sees as {"error": ...}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Upload:
    filename: str
    content_type: str
    data: bytearray = field(default_factory=bytearray)


class _Collector:
    """python-multipart callbacks that keep file parts in memory, within the limits, and remember the first error."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.uploads: list[Upload] = []
        self.error: UploadError | None = None
        self._headers: dict[bytes, bytes] = {}
        self._name = self._value = b""
        self._current: Upload | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
        }

    def fail(self, status: int, message: str) -> None:
        """Keep the first error and drop what was stored: the request is refused, its bytes are garbage now."""
        if self.error is None:
            self.error = UploadError(status, message)
        self.uploads.clear()
        self._current = None

    def on_part_begin(self) -> None:
        self._headers, self._current = {}, None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._name.strip().lower()] = self._value.strip()
        self._name = self._value = b""

    def on_headers_finished(self) -> None:
        if self.error:
            return
        _, options = parse_options_header(self._headers.get(b"content-disposition", b"").decode("latin-1"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name != FIELD:
            return self.fail(400, f"unexpected form field '{name}': send images as files in the '{FIELD}' field")
        if b"filename" not in options:
            return self.fail(400, f"'{FIELD}' holds text, not a file: upload images as files")
        if len(self.uploads) >= self.limits.max_files:
            return self.fail(413, f"too many files: at most {self.limits.max_files} per request")
        # Browsers send UTF-8 file names; parse_options_header kept them as latin-1 bytes.
        filename = options[b"filename"].decode("utf-8", "replace") or f"upload-{len(self.uploads) + 1}"
        content_type = parse_options_header(self._headers.get(b"content-type", b"").decode("latin-1"))[0].decode()
        # Clients label unknown files application/octet-stream; anything else that is not image/* is a mistake.
        if content_type and not content_type.startswith("image/") and content_type != "application/octet-stream":
            return self.fail(415, f"{filename}: content type {content_type} is not an image")
        self._current = Upload(filename, content_type)
        self.uploads.append(self._current)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is None:
            return
        if len(self._current.data) + (end - start) > self.limits.max_file_bytes:
            name, limit = self._current.filename, self.limits.max_file_bytes
            return self.fail(413, f"{name}: larger than the limit of {_size(limit)} per file")
        self._current.data += data[start:end]


async def read_uploads(request: Request, limits: Limits) -> list[Upload]:
    """The uploaded files of a `multipart/form-data` request (field `files`), or an UploadError saying why not."""
    media, params = parse_options_header(request.headers.get("content-type"))
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise UploadError(413, f"request larger than the limit of {_size(limits.max_request_bytes)}")
    if not media and declared in ("", "0"):
        raise UploadError(400, f"no files: POST multipart/form-data with images in the '{FIELD}' field")
    if media != b"multipart/form-data":
        raise UploadError(415, f"expected multipart/form-data, not {media.decode('latin-1') or 'no content type'}")
    if not params.get(b"boundary"):
        raise UploadError(400, "multipart/form-data without a boundary")
    collector = _Collector(limits)
    parser = MultipartParser(params[b"boundary"], collector.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limits.max_request_bytes:  # a missing or lying Content-Length
                raise UploadError(413, f"request larger than the limit of {_size(limits.max_request_bytes)}")
            if collector.error is None:  # after a refusal the rest is drained unparsed, so the client gets the answer
                parser.write(chunk)
        if collector.error is None:
            parser.finalize()
    except FormParserError:
        raise UploadError(400, "malformed multipart/form-data body") from None
    except ClientDisconnect:
        raise UploadError(400, "the client went away during the upload") from None
    if collector.error:
        raise collector.error
    if not collector.uploads:
        raise UploadError(400, f"no files: POST multipart/form-data with images in the '{FIELD}' field")
    return collector.uploads


def decode_upload(upload: Upload, max_pixels: int, reduce_to: int | None = None) -> Image.Image:
    """Decode with the dataset code path (transferkit.data.images), so the server accepts exactly the images
    training does, refuses bombs from the header and decodes as small as predict does (`reduce_to`)."""
    try:
        return decode_rgb(upload.data, max_pixels, reduce_to)
    except UnreadableImage as exc:
        raise UploadError(_status_for(str(exc)), f"{upload.filename}: {exc}") from None


def _status_for(reason: str) -> int:
    """load_rgb's reasons as HTTP statuses: too many pixels is 413, not an image 415, damaged data 400."""
    if reason.startswith("too large"):
        return 413
    if reason.startswith(("not an image", "unsupported color mode")):
        return 415
    return 400


def _size(n: int) -> str:
    return f"{n / MB:g} MB" if n >= MB else f"{n / 1024:g} KB"
