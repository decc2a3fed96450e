"""Bad (and awkward but valid) uploads for the fuzz suite, built in memory from one real X-ray.

Each `Case` is one request to an upload endpoint: either files in the endpoint's own field
(FIELD is replaced by `file` or `files`), or a raw body. `expect` maps each status it may
answer to the error codes allowed with it (None: a prediction). Bombs are small files declaring
huge images; nothing here needs more than a few MB of memory to build.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

FIELD = "<field>"  # stands for the endpoint's file field
OK = {200: (None,)}
UNREADABLE = {422: ("unreadable_image",)}
UNSUPPORTED = {415: ("unsupported_type",)}
MISSING = {400: ("missing_file",)}
IMAGE_TOO_LARGE = {422: ("image_too_large",)}
IMAGE_TOO_SMALL = {422: ("image_too_small",)}
TOO_LARGE = {413: ("request_too_large", "file_too_large")}  # Content-Length refused, or a part over the cap


@dataclass
class Case:
    name: str
    expect: dict[int, tuple[str | None, ...]]
    files: list[tuple[str, str, bytes]] = field(default_factory=list)  # (field, file name, bytes)
    body: bytes | None = None
    content_type: str | None = None
    bomb: bool = False  # decoding it would take hundreds of MB: the server's memory is watched

    @property
    def size(self) -> int:
        """Bytes of payload (files or body)."""
        return len(self.body or b"") + sum(len(data) for _, _, data in self.files)

    def fields(self, file_field: str) -> list[tuple[str, tuple[str, bytes, str]]]:
        """`requests`' files= list with FIELD replaced by `file_field`."""
        return [(file_field if f == FIELD else f, (name, data, "application/octet-stream"))
                for f, name, data in self.files]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int, bit_depth: int = 8, color: int = 0, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR declares width x height, with `idat` (maybe nothing) as its data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def png_bomb(side: int) -> bytes:
    """A complete, valid side x side 8-bit gray PNG of zeros: about side^2 / 1000 bytes, side^2 bytes decoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return png_header_only(side, side, idat=idat)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header is patched to declare width x height."""
    buf = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _pil(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def animated_gif(gray: np.ndarray) -> bytes:
    frames = [Image.fromarray(gray), Image.fromarray(255 - gray)]
    return _pil(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def corrupt_scan(jpeg: bytes) -> bytes:
    """The real JPEG with a stretch of its entropy-coded data overwritten (headers intact)."""
    data = bytearray(jpeg)
    start = data.index(b"\xff\xda") + 200
    rng = np.random.default_rng(0)
    data[start:start + 4000] = rng.integers(0, 255, 4000, dtype=np.uint8).tobytes()  # 0xff-free: no fake markers
    return bytes(data)


def build_corpus(xray: bytes, max_batch: int) -> list[Case]:
    """Every case from the issue, from one real full-size X-ray (JPEG bytes)."""
    gray = cv2.imdecode(np.frombuffer(xray, np.uint8), cv2.IMREAD_GRAYSCALE)
    small = cv2.resize(gray, (gray.shape[1] // 4, gray.shape[0] // 4), interpolation=cv2.INTER_AREA)
    png = cv2.imencode(".png", small)[1].tobytes()
    image = Image.fromarray(small)

    def one(name: str, data: bytes, expect: dict, filename: str = "scan.jpg", bomb: bool = False) -> Case:
        return Case(name, expect, files=[(FIELD, filename, data)], bomb=bomb)

    return [
        one("truncated JPEG", xray[: len(xray) // 2], UNREADABLE),
        one("JPEG cut after its header", xray[:700], UNREADABLE),
        one("corrupt JPEG header (garbage after SOI)", b"\xff\xd8\xff" + bytes(range(256)) * 8, UNREADABLE),
        # libjpeg decodes damaged entropy data as best it can (with warnings): a prediction or a 422, never a 500.
        one("JPEG with damaged scan data", corrupt_scan(xray), {**OK, **UNREADABLE}),
        one("truncated PNG", png[: len(png) // 2], UNREADABLE, "scan.png"),
        one("PNG with a corrupt IDAT", png_header_only(256, 256, idat=b"not zlib at all" * 10), UNREADABLE,
            "scan.png"),
        one("PNG signature only", b"\x89PNG\r\n\x1a\n", UNREADABLE, "scan.png"),
        one("0-byte file", b"", {400: ("empty_file",)}),
        one("text renamed .jpg", b"Patient notes: nothing to see here.\n" * 40, UNSUPPORTED),
        one("PDF renamed .jpg", b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n" * 20,
            UNSUPPORTED),
        one("HTML renamed .png", b"<html><script>alert(1)</script></html>", UNSUPPORTED, "x.png"),
        one("WebP", _pil(image, "WEBP"), UNSUPPORTED, "scan.webp"),
        one("BMP", _pil(image, "BMP"), UNSUPPORTED, "scan.bmp"),
        one("TIFF", _pil(image, "TIFF"), UNSUPPORTED, "scan.tif"),
        one("DICOM preamble with garbage", b"\x00" * 128 + b"DICM" + b"\xff" * 300, UNREADABLE, "scan.dcm"),
        one("PNG bomb (20000x20000, complete zlib stream)", png_bomb(20000), IMAGE_TOO_LARGE,
            "bomb.png", bomb=True),
        one("PNG declaring 65535x65535 (header only)", png_header_only(65535, 65535), IMAGE_TOO_LARGE,
            "bomb.png", bomb=True),
        one("JPEG declaring 20000x20000 (header only)", jpeg_declaring(20000, 20000), IMAGE_TOO_LARGE,
            bomb=True),
        one("JPEG declaring 0x0", jpeg_declaring(0, 0), UNREADABLE),
        one("1x1 PNG", cv2.imencode(".png", np.zeros((1, 1), np.uint8))[1].tobytes(), IMAGE_TOO_SMALL,
            "dot.png"),
        one("1x1 JPEG", _pil(Image.new("L", (1, 1)), "JPEG"), IMAGE_TOO_SMALL),
        one("16-bit PNG (full range)", cv2.imencode(".png", small.astype(np.uint16) * 257)[1].tobytes(), OK,
            "scan16.png"),
        one("16-bit PNG (12-bit data)", cv2.imencode(".png", small.astype(np.uint16) * 16)[1].tobytes(), OK,
            "scan12.png"),
        one("CMYK JPEG", _pil(image.convert("CMYK"), "JPEG", quality=95), OK),
        one("palette PNG", _pil(image.convert("P"), "PNG"), OK, "scan.png"),
        one("RGBA PNG", _pil(image.convert("RGBA"), "PNG"), OK, "scan.png"),
        one("gray+alpha PNG", _pil(image.convert("LA"), "PNG"), OK, "scan.png"),
        one("1-bit PNG", _pil(image.convert("1"), "PNG"), OK, "scan.png"),
        one("animated GIF", animated_gif(small), UNSUPPORTED, "scan.gif"),
        one("unicode file name", xray, OK, "röntgen-胸部-\u202etxt.jpeg 🫁.jpeg"),
        one("path traversal file name", xray, OK, "../../../../etc/passwd"),
        one("Windows path traversal file name", xray, OK, "..\\..\\windows\\win.ini.jpg"),
        one("very long file name", xray, OK, "x" * 5000 + ".jpeg"),
        one("file name with NUL and newlines", xray, OK, "a\x00b\r\nX-Injected: 1.jpeg"),
        Case("wrong form field", MISSING, files=[("image", "scan.jpeg", xray)]),
        Case("text field instead of a file", MISSING, body=b"--b\r\nContent-Disposition: form-data; "
             b'name="file"\r\n\r\nnot a file\r\n--b--\r\n', content_type="multipart/form-data; boundary=b"),
        Case(f"too many files ({max_batch + 1})", {400: ("too_many_files",)},
             files=[(FIELD, f"{i}.jpeg", png) for i in range(max_batch + 1)]),
        Case("1,000 tiny files", TOO_LARGE, files=[(FIELD, f"{i}.png", b"x") for i in range(1000)]),
        Case("50 MB body", TOO_LARGE,
             files=[(FIELD, "big.jpeg", b"\xff\xd8\xff\xe0" + bytes(50 * 2**20))]),
        Case("non-multipart body (raw JPEG)", MISSING, body=xray, content_type="image/jpeg"),
        Case("JSON body", MISSING, body=b'{"file": "scan.jpeg"}', content_type="application/json"),
        Case("multipart without a boundary", MISSING, body=b"--x\r\n\r\n",
             content_type="multipart/form-data"),
        Case("multipart never closed", MISSING,
             body=b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n' + xray[:5000],
             content_type="multipart/form-data; boundary=b"),
    ]
