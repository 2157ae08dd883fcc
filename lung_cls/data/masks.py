"""Bit-packed boolean masks: the phantom's ground truth held at one bit per pixel.

The phantom gives every case 14 truth masks (lungs, heart and 12 features). As ``bool`` arrays at
256 x 256 the 530-image cohort's non-empty masks alone are about 100 MB; the pre-processed masks at
224 x 224 would be 370 MB. `PackedMasks` keeps them packed (``np.packbits`` along the last axis,
8 pixels per byte) and unpacks a mask only when a caller reads it. Masks that are all False share
one packed array per shape, so the features a case does not show cost nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=8)
def _packed_empty(shape: tuple[int, ...]) -> np.ndarray:
    """The packed form of an all-False mask of ``shape`` (shared, read-only)."""
    p = np.packbits(np.zeros(shape, dtype=bool), axis=-1)
    p.flags.writeable = False
    return p


class PackedMasks(Mapping):
    """Read-only ``{name: bool array}`` stored bit-packed along the last axis.

    ``packed[name]`` is ``np.packbits(mask, axis=-1)``; ``width`` is the masks' last dimension
    (packing pads it to a multiple of 8). ``keep_unpacked=True`` keeps a mask once it has been
    unpacked (a data set's masks, read again and again by the CAM scoring);
    ``keep_unpacked=False`` unpacks afresh on every read (one phantom case's masks, each read once
    by pre-processing, so holding them unpacked would undo the saving).
    """

    def __init__(
        self, packed: Mapping[str, np.ndarray], width: int, *, keep_unpacked: bool = True
    ) -> None:
        self._packed = dict(packed)
        self._width = int(width)
        self._keep = bool(keep_unpacked)
        self._cache: dict[str, np.ndarray] = {}

    @classmethod
    def pack(cls, masks: Mapping[str, np.ndarray], *, keep_unpacked: bool = False) -> PackedMasks:
        """Pack a ``{name: bool array}`` of one shape; all-False masks share one packed array."""
        packed: dict[str, np.ndarray] = {}
        width = None
        for name, m in masks.items():
            m = np.asarray(m, dtype=bool)
            if width is None:
                width, shape = m.shape[-1], m.shape
            elif m.shape != shape:
                raise ValueError(f"mask {name!r}: shape {m.shape}, the others are {shape}")
            packed[name] = np.packbits(m, axis=-1) if m.any() else _packed_empty(m.shape)
        return cls(packed, 0 if width is None else width, keep_unpacked=keep_unpacked)

    def __getitem__(self, name: str) -> np.ndarray:
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        bits = np.unpackbits(self._packed[name], axis=-1, count=self._width).view(bool)
        if self._keep:
            self._cache[name] = bits
        return bits

    def packed(self, name: str) -> np.ndarray:
        """The bit-packed array, e.g. uint8 (N, S, ceil(S / 8)) as the cache stores it."""
        return self._packed[name]

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed arrays (a shared empty one counted once) + unpacked copies."""
        seen = {id(a): a.nbytes for a in self._packed.values()}
        return sum(seen.values()) + sum(a.nbytes for a in self._cache.values())

    def __iter__(self):
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def __repr__(self) -> str:
        return f"PackedMasks({sorted(self._packed)})"
