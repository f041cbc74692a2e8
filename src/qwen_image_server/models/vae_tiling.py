"""``--vae-tiling on``: the VAE decodes (and, for edits, encodes) images in overlapping tiles.

The VAE's working memory grows with the image: decoding a 1024x1024 image held 6.2 GiB
above the weights in float32 on a CPU (3.1 GiB in bf16), and its share of a worker's
working memory is most of the measured line in ``working_memory.py``. diffusers'
``AutoencoderKLQwenImage`` can work on 256x256-pixel tiles at a 192-pixel stride instead,
blending the 64-pixel overlaps: the working memory is then about a tile's, whatever the
image size (0.67 GiB for that decode), and the overlaps are computed twice (1.31x the
decode's time on the CPU; on a GPU a decode is a small share of an image's time). Pixels near the seams differ from an
untiled decode (the blend); elsewhere they are the same computation on a window of the
latents. Images of at most 256x256 are not tiled. ``bench/vae_fast.py --tiling``
measures time and peak memory of both.

The setting is the model's run profile's, switched for each call: a VAE shared by two
models of one process (``--share-components``) tiles for the one that asks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def vae_tiling(vae, on: bool) -> Iterator[None]:
    """Within the block, ``vae`` tiles when ``on`` and does not otherwise; its former setting afterwards. A VAE
    without tiling support is left alone."""
    if vae is None or not hasattr(vae, "use_tiling"):
        yield
        return
    before = vae.use_tiling
    vae.use_tiling = on
    try:
        yield
    finally:
        vae.use_tiling = before
