"""Decoding a plain or gzip byte stream piece by piece, never further than asked.

NIfTI reading (`nifti.py`) decodes a header, then exactly as many bytes as the header
promises, then checks that nothing follows: a gzip bomb therefore decodes no further than
its header's promise. `zlib.decompressobj(...).decompress(data, max_length)` does the
capping; `gzip.decompress` would decode everything first.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Iterator

from stroke_ray.errors import InputFileError

__all__ = ["GZIP_MAGIC", "StreamDecoder"]

GZIP_MAGIC = b"\x1f\x8b"
# No single decoded piece is larger than this: the transient memory of a read beyond the
# caller's output buffer.
_PIECE = 8 << 20


class StreamDecoder:
    """Decoded bytes of a plain or gzip stream, pulled on demand, never more than asked.

    `chunks` yields the raw bytes; gzip is recognised by its magic number, not the file
    name. Concatenated gzip members and zero padding after the last one are accepted, as
    the gzip tool does.

    Args:
        chunks: the raw (plain or gzip) bytes, in pieces of any size.
        source: the file or upload field named in errors.
        digest: a hash updated with every raw byte read, or None.
    """

    def __init__(self, chunks: Iterator[bytes], source: str, digest: "hashlib._Hash | None"):
        self._chunks = chunks
        self._source = source
        self._digest = digest
        first = self._next_input() or b""
        self.gzipped = bytes(first[:2]) == GZIP_MAGIC
        self._pending = first
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if self.gzipped else None
        self.decoded = 0  # bytes decoded so far
        self.cut = False  # a gzip stream that ended without its end marker

    def _next_input(self) -> bytes | None:
        for chunk in self._chunks:
            if len(chunk):
                if self._digest is not None:
                    self._digest.update(chunk)
                return chunk
        return None

    def _piece(self, max_out: int) -> bytes:
        """At most `max_out` decoded bytes; b"" only at the end of the stream.

        Raises:
            InputFileError: corrupt gzip data.
        """
        while True:
            if self._inflate is None:
                data = self._pending if len(self._pending) else self._next_input()
                if data is None:
                    return b""
                piece, self._pending = bytes(data[:max_out]), data[max_out:]
                self.decoded += len(piece)
                return piece
            if self._inflate.eof:
                rest = self._inflate.unused_data or self._pending or self._next_input()
                self._pending = b""
                while rest is not None and not bytes(rest).strip(b"\0"):
                    rest = self._next_input()
                if rest is None:
                    return b""
                rest = bytes(rest).lstrip(b"\0")
                if rest[:2] != GZIP_MAGIC:
                    raise InputFileError(self._source, "corrupt gzip data (unexpected bytes after the end of the stream)")
                self._inflate, self._pending = zlib.decompressobj(16 + zlib.MAX_WBITS), rest
                continue
            data = self._inflate.unconsumed_tail or self._pending or self._next_input()
            self._pending = b""
            try:
                if data is None:
                    # Input used up: zlib may still hold output; if not, the stream was cut.
                    piece = self._inflate.decompress(b"", max_out)
                    if piece:
                        return piece
                    if self._inflate.eof:
                        continue
                    self.cut = True  # the caller words it: it knows what was promised
                    return b""
                piece = self._inflate.decompress(data, max_out)
            except zlib.error as exc:
                raise InputFileError(self._source, f"corrupt gzip data ({exc})") from None
            if piece:
                self.decoded += len(piece)
                return piece

    def read_into(self, out: memoryview) -> int:
        """Fill `out`; returns the bytes written (fewer only at the end of the stream)."""
        filled = 0
        while filled < len(out):
            piece = self._piece(min(_PIECE, len(out) - filled))
            if not piece:
                break
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
        return filled

    def skip(self, n: int) -> int:
        """Decode and drop `n` bytes (header extensions); returns how many there were."""
        done = 0
        while done < n:
            piece = self._piece(min(_PIECE, n - done))
            if not piece:
                break
            done += len(piece)
        return done

    def at_end(self) -> bool:
        """True when nothing more decodes; a gzip stream must also end with its trailer."""
        return not self._piece(1) and not self.cut
