"""Images checked and normalized with Pillow before llama.cpp sees them.

libmtmd decodes with stb_image and crashes or misreads on some inputs (truncated
files, huge dimensions, CMYK JPEGs, palettes with transparency), so every image is
decoded here first, under explicit limits, and handed over as plain RGB pixels.

The size is chosen the way mistral-common chooses it (the longest side scaled down to
the model's maximum, then each side rounded *up* to whole 28-pixel tokens), so the
number of image tokens equals what Mistral's own tokenizer counts; libmtmd then gets
an image it does not need to resize again.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from smallfour.errors import SmallfourError

# Larger files are refused before decoding: no real photo needs more.
MAX_FILE_BYTES = 64 * 1024 * 1024
# Decoded size limit (pixels). Anything larger is a decompression bomb or a scan far beyond
# what the 1540-pixel model input can use; 40 megapixels is a generous camera photo.
MAX_PIXELS = 40_000_000

# Mistral Small 4's image geometry (tekken.json `image` section, the mmproj says the same).
PATCH_SIZE = 14
SPATIAL_MERGE = 2
MAX_IMAGE_SIZE = 1540


@dataclass(frozen=True)
class Geometry:
    patch_size: int = PATCH_SIZE
    spatial_merge: int = SPATIAL_MERGE
    max_image_size: int = MAX_IMAGE_SIZE

    @property
    def token_pixels(self) -> int:
        return self.patch_size * self.spatial_merge


@dataclass(frozen=True)
class PreparedImage:
    label: str  # what the user gave: a path or "data: URL"
    width: int
    height: int
    rgb: bytes  # width*height*3 bytes, row-major
    tokens_x: int  # image tokens per row
    tokens_y: int  # rows of image tokens

    @property
    def n_tokens(self) -> int:
        """Prompt positions the image takes: a token per cell, plus [IMG_BREAK]/[IMG_END] per row."""
        return (self.tokens_x + 1) * self.tokens_y


def token_grid(width: int, height: int, geometry: Geometry = Geometry()) -> tuple[int, int]:
    """(tokens per row, rows) for an image of this size, as mistral-common computes it."""
    ratio = max(height / geometry.max_image_size, width / geometry.max_image_size)
    if ratio > 1:
        width, height = max(round(width / ratio), 1), max(round(height / ratio), 1)
    step = geometry.token_pixels
    return (width - 1) // step + 1, (height - 1) // step + 1


def image_tokens(width: int, height: int, geometry: Geometry = Geometry()) -> int:
    """Prompt tokens an image of this size takes ([IMG]s, [IMG_BREAK]s and the [IMG_END])."""
    x, y = token_grid(width, height, geometry)
    return (x + 1) * y


def read_source(source: str) -> tuple[str, bytes]:
    """The bytes of an image given as a file path or a `data:image/...;base64,` URL."""
    if source.startswith("data:"):
        header, comma, payload = source.partition(",")
        if not comma or ";base64" not in header:
            raise SmallfourError("image data: URL must look like data:image/png;base64,…")
        try:
            return "data: URL", base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise SmallfourError("image data: URL does not hold valid base64") from None
    if source.startswith(("http://", "https://")):
        raise SmallfourError(f"image {source}: URLs are not fetched; download the file and give its path")
    path = Path(source.removeprefix("file://")).expanduser()
    if not path.exists():
        raise SmallfourError(f"image file {path} does not exist")
    if not path.is_file():
        raise SmallfourError(f"image {path} is not a file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise SmallfourError(f"image {path} is {size / 1e6:.0f} MB, more than the {MAX_FILE_BYTES // 2**20} MiB limit")
    try:
        return str(path), path.read_bytes()
    except OSError as exc:
        raise SmallfourError(f"cannot read image {path}: {exc.strerror or exc}") from None


def prepare_image(source: str, geometry: Geometry = Geometry()) -> PreparedImage:
    """Decode, validate and normalize one image (path or data: URL) for the model."""
    label, data = read_source(source)
    return prepare_bytes(label, data, geometry)


def prepare_bytes(label: str, data: bytes, geometry: Geometry = Geometry()) -> PreparedImage:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > MAX_FILE_BYTES:
        raise SmallfourError(f"image {label} is more than the {MAX_FILE_BYTES // 2**20} MiB limit")
    with warnings.catch_warnings():
        # Pillow only warns between its own limit and twice it; we refuse all of it.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        pillow_limit = Image.MAX_IMAGE_PIXELS
        try:
            # Our own limit, checked on the header below, gives the clearer message.
            Image.MAX_IMAGE_PIXELS = None
            try:
                image = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = pillow_limit
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise SmallfourError(f"image {label} is {width}×{height} pixels, more than the "
                                     f"{MAX_PIXELS // 1_000_000}-megapixel limit (a decompression bomb?)")
            image.load()
            image = ImageOps.exif_transpose(image)
        except SmallfourError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise SmallfourError(f"image {label} decodes to too many pixels (a decompression bomb?)") from None
        except UnidentifiedImageError:
            raise SmallfourError(f"{label} is not an image Pillow can read (PNG, JPEG, WebP, GIF, BMP, …)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise SmallfourError(f"image {label} is truncated or damaged: {exc}") from None
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animations: the first frame, as mistral-common's Pillow path does
    rgb = _to_rgb(image)
    tokens_x, tokens_y = token_grid(rgb.width, rgb.height, geometry)
    size = (tokens_x * geometry.token_pixels, tokens_y * geometry.token_pixels)
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    return PreparedImage(label, size[0], size[1], rgb.tobytes(), tokens_x, tokens_y)


def _to_rgb(image):
    """RGB pixels; transparency composited over white as mistral-common does (palette, LA, CMYK too)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float grey: scale to 8 bits first, Pillow's convert would clip instead.
        image = image.point(lambda v: v / 256).convert("L") if image.mode.startswith("I;16") \
            else image.convert("L")
    if image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, "WHITE")
    background.paste(rgba, (0, 0), rgba)
    return background.convert("RGB")
