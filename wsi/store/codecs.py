"""How tile pixels are compressed in the store: JPEG (default) or lossless zstd.

Lossless zstd gains only ~1.2x on H&E (~160 KB per 256-px tile); the slides themselves are JPEG at
quality ~70-90, so re-encoding their tiles as JPEG costs little and makes a cohort fit on a disk.
The default, JPEG quality 90 without chroma subsampling (4:4:4), was chosen by measurement
(scripts/bench/bench_tile_codec.py; README, "Tile codec").

The JPEG codec is imagecodecs' numcodecs codec `imagecodecs_jpeg` under zarr v3's numcodecs naming
(`numcodecs.imagecodecs_jpeg`), so any zarr v3 reader with imagecodecs can read the tiles (see the
README). A chunk of TILE_CHUNK tiles (k, P, P, 3) is encoded as one k*P x P JPEG image, the tiles
stacked top to bottom; decoding reshapes it back. With P a multiple of 16 no JPEG block straddles
two tiles.
"""
from __future__ import annotations

import asyncio
import functools
import re
import warnings

LOSSLESS = "lossless"
DEFAULT_JPEG_QUALITY = 90
DEFAULT_TILE_CODEC = f"jpeg-{DEFAULT_JPEG_QUALITY}"
_JPEG_RE = re.compile(r"^jpeg(?:-(\d{1,3}))?$")
_NOT_IN_SPEC = "Numcodecs codecs are not in the Zarr version 3 specification"


def parse_tile_codec(codec: str) -> str:
    """Normalise a codec name: "jpeg" -> "jpeg-90", "jpeg-80", "lossless"; ValueError otherwise."""
    codec = str(codec).strip().lower()
    if codec in (LOSSLESS, "zstd"):
        return LOSSLESS
    m = _JPEG_RE.match(codec)
    if m:
        q = int(m.group(1) or DEFAULT_JPEG_QUALITY)
        if 1 <= q <= 100:
            return f"jpeg-{q}"
    raise ValueError(f"unknown tile codec {codec!r}; use jpeg, jpeg-QUALITY (1-100) or lossless")


@functools.cache
def _jpeg_class():
    import imagecodecs.numcodecs
    import zarr.registry
    from zarr.codecs.numcodecs import _NumcodecsArrayBytesCodec

    imagecodecs.numcodecs.register_codecs(verbose=False)   # numcodecs' registry: 'imagecodecs_jpeg'

    class JpegTiles(_NumcodecsArrayBytesCodec, codec_name="imagecodecs_jpeg"):
        """imagecodecs' JPEG for chunks of tiles: (k, P, P, 3) is encoded as a (k*P, P, 3) image."""

        def __init__(self, **config):
            # zarr warns that numcodecs codecs are outside the v3 spec each time one is built (every open
            # of a tile array); that is known and documented, so it is silenced here only, for this codec.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NOT_IN_SPEC)
                super().__init__(**config)

        async def _encode_single(self, chunk_data, chunk_spec):
            a = chunk_data.as_ndarray_like()
            a = a.reshape(-1, *a.shape[-2:])
            out = await asyncio.to_thread(self._codec.encode, a)
            return chunk_spec.prototype.buffer.from_bytes(out)

    zarr.registry.register_codec("numcodecs.imagecodecs_jpeg", JpegTiles)
    return JpegTiles


def register() -> None:
    """Make zarr able to read (and write) JPEG tile arrays in this process; idempotent."""
    _jpeg_class()


def tile_array_codecs(codec: str) -> dict:
    """Keyword arguments for zarr's `create_array` that store tiles with `codec`."""
    codec = parse_tile_codec(codec)
    if codec == LOSSLESS:
        from zarr.codecs import ZstdCodec

        # zstd level 1 gets nearly all of lossless compression's ~1.2x for less CPU than the default.
        return {"compressors": [ZstdCodec(level=1)]}
    # 4:4:4 (no chroma subsampling): at quality 90 features of JPEG tiles keep cosine 0.995-0.998
    # to lossless ones (0.989-0.990 with libjpeg's default 4:2:0) for ~35 KB per 256-px tile.
    serializer = _jpeg_class()(level=int(codec.split("-")[1]), subsampling="444")
    return {"serializer": serializer, "compressors": None}
