"""Direct reads of patches from a store's Zarr chunks: fetched concurrently, decoded once.

A training visit cuts a few random patches from one subject. Reading each patch through
zarr costs ~4x the decompression itself (zarr's per-chunk pipeline, measured in
docs/sampling.md), and every patch re-decodes chunks its neighbours already decoded.
`ChunkReader` instead takes the chunks all of a visit's patches touch, fetches their bytes
in one concurrent batch from whatever store holds them (local files, S3 through fsspec:
one request each, all in flight at once on zarr's event loop), decodes each once with
Blosc (which releases the GIL) and cuts every patch from the decoded chunks.

It reads the layout stroke-ray writes (`store.py`: a regular chunk grid, little-endian
bytes, optionally Blosc); any other codec chain is read through zarr itself, so a store of
another layout is still read correctly, only slower. The batch fetch runs on zarr's own
event loop (`zarr.core.sync.sync`, where zarr's stores live) and names chunks with the
array's chunk-key encoding: zarr internals, checked against zarr's own reads by
tests/test_sampling.py (`test_direct_reads_give_the_cached_patches`) on every upgrade.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable

import numcodecs.blosc
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

__all__ = ["ChunkReader"]

Box = tuple[tuple[int, int, int], tuple[int, int, int]]  # (corner, size) in voxels


def _direct_codecs(array: zarr.Array) -> tuple[bool, bool]:
    """(readable here, compressed with Blosc) for the array's codec chain."""
    codecs = tuple(array.metadata.codecs)
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return False, False
    little = codecs[0].endian is None or codecs[0].endian.value == "little"
    if len(codecs) == 1:
        return little, False
    return little and len(codecs) == 2 and isinstance(codecs[1], BloscCodec), True


class ChunkReader:
    """Boxes (patches) of one Zarr array whose last three axes are spatial.

    Args:
        array: a zarr v3 array of shape (..., X, Y, Z).
    """

    def __init__(self, array: zarr.Array):
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        self.lead = self.shape[:-3]
        self.dtype = np.dtype(array.dtype)
        self.fill = np.asarray(array.metadata.fill_value, dtype=self.dtype)
        self.direct, self.blosc = _direct_codecs(array)
        grid = array.metadata.chunk_grid
        self.chunk = tuple(int(c) for c in grid.chunk_shape) if hasattr(grid, "chunk_shape") else None
        if self.chunk is None or self.chunk[:-3] != self.lead:
            self.direct = False  # chunks that split the leading axes: read through zarr

    # --- which chunks ------------------------------------------------------------------
    def chunk_ids(self, boxes: Iterable[Box]) -> set[tuple[int, int, int]]:
        """Spatial chunk coordinates that the boxes (clipped to the array) touch."""
        ids: set[tuple[int, int, int]] = set()
        edge = self.chunk[-3:]
        for corner, size in boxes:
            ranges = []
            for c, n, s, e in zip(corner, size, self.shape[-3:], edge):
                lo, hi = max(c, 0), min(c + n, s)
                if hi <= lo:
                    break
                ranges.append(range(lo // e, (hi - 1) // e + 1))
            else:
                ids.update(itertools.product(*ranges))
        return ids

    def fetch(self, ids: Iterable[tuple[int, int, int]], pool: list[np.ndarray] | None = None
              ) -> dict[tuple[int, int, int], np.ndarray | None]:
        """Decoded chunks by spatial chunk id; None for a chunk never written (all fill).

        Args:
            ids: spatial chunk coordinates (`chunk_ids`).
            pool: reusable byte buffers to decode into (grown as needed, shared by every
                reader of the same chunk size): fresh buffers cost a page fault per 4 KiB,
                about as much as the decompression itself. The chunks then stay valid only
                until the pool's next `fetch`.
        """
        ids = sorted(ids)
        lead_ids = (0,) * len(self.lead)
        encode = self.array.metadata.chunk_key_encoding.encode_chunk_key
        store, prefix = self.array.store_path.store, self.array.store_path.path
        keys = [f"{prefix}/{encode(lead_ids + i)}" if prefix else encode(lead_ids + i) for i in ids]
        proto = default_buffer_prototype()

        async def get_all():
            return await asyncio.gather(*(store.get(k, prototype=proto) for k in keys))

        out: dict[tuple[int, int, int], np.ndarray | None] = {}
        nbytes = int(np.prod(self.chunk)) * self.dtype.itemsize
        used = 0
        for i, buf in zip(ids, sync(get_all())):
            if buf is None:
                out[i] = None
                continue
            raw = buf.to_bytes()
            if not self.blosc:
                data = np.frombuffer(raw, dtype=np.uint8)
            elif pool is None:
                data = np.frombuffer(numcodecs.blosc.decompress(raw), dtype=np.uint8)
            else:
                if used == len(pool):
                    pool.append(np.empty(nbytes, np.uint8))
                data = pool[used]
                used += 1
                numcodecs.blosc.decompress(raw, data)
            out[i] = data.view(self.dtype.newbyteorder("<")).reshape(self.chunk)
        return out

    # --- boxes ---------------------------------------------------------------------------
    def read(self, corner: tuple[int, int, int], size: tuple[int, int, int],
             chunks: dict[tuple[int, int, int], np.ndarray | None] | None = None) -> np.ndarray:
        """array[..., x:x+n, y:y+n, z:z+n] as a new array; outside the array: the fill value.

        Args:
            corner, size: the box in voxels (the corner may be negative, the box may reach
                past the far edge).
            chunks: decoded chunks from `fetch` holding every chunk the box touches (one
                fetch serves many boxes); fetched here when None.
        """
        out = np.empty(self.lead + tuple(size), dtype=self.dtype)
        inside = all(c >= 0 and c + n <= s for c, n, s in zip(corner, size, self.shape[-3:]))
        if not (inside and self.direct):  # a box inside the volume is covered by its chunks
            out[...] = self.fill
        if not self.direct:
            src = tuple(slice(max(c, 0), min(c + n, s)) for c, n, s in zip(corner, size, self.shape[-3:]))
            dst = tuple(slice(s.start - c, s.stop - c) for s, c in zip(src, corner))
            if all(s.stop > s.start for s in src):
                out[(..., *dst)] = self.array[(..., *src)]
            return out
        box = (tuple(corner), tuple(size))
        if chunks is None:
            chunks = self.fetch(self.chunk_ids([box]))
        edge = self.chunk[-3:]
        for cid in self.chunk_ids([box]):
            data = chunks[cid]
            if data is None and not inside:
                continue  # a chunk never written is all fill: `out` already holds it
            src, dst = [], []
            for k, (c, n, s, e) in enumerate(zip(corner, size, self.shape[-3:], edge)):
                lo = max(c, cid[k] * e, 0)
                hi = min(c + n, (cid[k] + 1) * e, s)
                src.append(slice(lo - cid[k] * e, hi - cid[k] * e))
                dst.append(slice(lo - c, hi - c))
            out[(..., *dst)] = self.fill if data is None else data[(..., *src)]
        return out
