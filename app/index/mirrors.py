"""Comparing frames under their mirror images, at the cost of one product.

A frame descriptor may end in a thumbnail (N x N grey levels) stored in its *mirror
components*: the thumbnail's parts that are even or odd under the left-right flip and
under the up-down flip, four blocks of (N/2)^2 values, EE, EO, OE, OO (vertical parity
first). The change of basis is orthonormal, so cosines are those of the thumbnails
themselves. Mirroring a frame only changes signs: the left-right flip negates EO and OO,
the up-down flip OE and OO, the half turn EO and OE. So the best of a pair of frames'
four dot products (as they are, and with one of them mirrored three ways) comes from
block products: with X the product of everything before the odd blocks (the network's
part and EE), and E, O, Z those of EO, OE, OO,

    max(X + E + O + Z, X - E + O - Z, X + E - O - Z, X - E - O + Z)
        = X + max(Z + |E + O|, |E - O| - Z),

which costs one product of the whole descriptor and one more of the EO and OE blocks,
not four products. A copy that is mirrored (or mirrored and cropped, or turned upside
down) then matches its source frame by frame, where an untrained network's features are
not mirror-invariant (README, "Mirror-matched thumbnails").

Frames are compared after centring on the library's mean frame: that mean is taken
mirror-symmetric (its odd blocks zeroed, :meth:`Mirrors.symmetric`), so that centring
commutes with mirroring and the identity above holds for centred frames too.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@functools.cache
def mirror_basis(n: int) -> np.ndarray:
    """The (N^2, N^2) orthonormal matrix taking a row-major N x N thumbnail to its mirror
    components EE, EO, OE, OO, each (N/2)^2 values, row-major over the top-left quadrant.
    N must be even. Made once per size (every embedded chunk uses it), read-only."""
    if n < 2 or n % 2:
        raise ValueError(f"mirror components need an even thumbnail size, got {n}")
    h = n // 2
    # One axis: position i < h and its mirror n-1-i -> even (sum) and odd (difference) parts.
    even, odd = np.zeros((h, n)), np.zeros((h, n))
    for i in range(h):
        even[i, i] = even[i, n - 1 - i] = 1 / np.sqrt(2)
        odd[i, i], odd[i, n - 1 - i] = 1 / np.sqrt(2), -1 / np.sqrt(2)
    basis = np.concatenate([np.kron(rows, cols) for rows in (even, odd) for cols in (even, odd)])
    basis.flags.writeable = False
    return basis


def mirror_invariant(components: np.ndarray) -> np.ndarray:
    """Rows (..., N^2) of thumbnails' mirror components (EE, EO, OE, OO) -> what is the
    same for a thumbnail and its mirror images: the EE block, then the other blocks'
    magnitudes (mirroring only changes their signs). For a mean over frames, whose odd
    blocks change sign together under a mirror."""
    components = np.asarray(components, dtype=np.float32)
    block = components.shape[-1] // 4
    return np.concatenate([components[..., :block], np.abs(components[..., block:])], axis=-1)


@dataclass(frozen=True)
class Mirrors:
    """Where a descriptor's mirror components lie: from ``start``, four blocks of
    ``block`` values (EE, EO, OE, OO); everything before them is compared as it is."""

    start: int
    block: int

    @classmethod
    def of(cls, encoder_config: Mapping[str, Any]) -> Mirrors | None:
        """The layout an encoder's frame descriptors have (its config as stored with a
        model version, ``app.learn.encoder.EncoderConfig.to_dict``); None when they have
        no mirror components."""
        if not encoder_config.get("frame_thumbnail_mirrors") or not encoder_config.get("frame_thumbnail"):
            return None
        side = int(encoder_config["frame_thumbnail"]) // 2
        return cls(int(encoder_config["frame_dim"]), side * side)

    @property
    def _odd(self) -> slice:
        return slice(self.start + self.block, self.start + 4 * self.block)

    def symmetric(self, vector: np.ndarray) -> np.ndarray:
        """``vector`` (D,) with its odd blocks zeroed: its own mirror images' mean."""
        out = np.array(vector, dtype=np.float32)
        out[self._odd] = 0.0
        return out

    def products(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """(Nl, Nr): for each pair of rows, the largest dot product of the left one with
        the right one or one of its three mirror images (see the module docstring)."""
        s, b = self.start, self.block
        left, right = np.asarray(left, dtype=np.float32), np.asarray(right, dtype=np.float32)
        best = left[:, : s + b] @ right[:, : s + b].T  # X
        z = left[:, s + 3 * b : s + 4 * b] @ right[:, s + 3 * b : s + 4 * b].T
        odd = right[:, s + b : s + 3 * b]
        flipped = np.concatenate([odd[:, :b], -odd[:, b:]], axis=1)
        # |E + O| and |E - O| for every pair from one product, (Nl, 2 Nr), worked on in place
        e_o = left[:, s + b : s + 3 * b] @ np.concatenate([odd, flipped]).T
        np.abs(e_o, out=e_o)
        n = len(right)
        plus, minus = e_o[:, :n], e_o[:, n:]
        plus += z
        minus -= z
        best += np.maximum(plus, minus, out=plus)
        return best
