"""Images checked and normalized with Pillow before llama.cpp sees them.

libmtmd decodes with stb_image and crashes or misreads on some inputs (truncated
files, huge dimensions, CMYK JPEGs, palettes with transparency), so every image is
decoded here first, under explicit limits, and handed over as plain RGB pixels.

The size is chosen the way mistral-common chooses it (the longest side scaled down to
the model's maximum, then each side rounded *up* to whole 28-pixel tokens), so the
number of image tokens equals what Mistral's own tokenizer counts, and resized with
the same filter (OpenCV's bicubic, in numpy); libmtmd then gets an image it does not
need to resize again.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


# Formats accepted, told apart by their first bytes before any Pillow plugin sees the data: the raster
# formats photos and screenshots come in. Everything else (EPS/PostScript and PDF above all, which
# Pillow would hand to Ghostscript; ICO, PSD, SVG, …) is refused without being parsed.
SIGNATURES: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    ("PNG", (b"\x89PNG\r\n\x1a\n",)),
    ("JPEG", (b"\xff\xd8\xff",)),
    ("GIF", (b"GIF87a", b"GIF89a")),
    ("BMP", (b"BM",)),
    ("TIFF", (b"II*\x00", b"MM\x00*")),
)
ACCEPTED_FORMATS = ("PNG", "JPEG", "WebP", "GIF", "BMP", "TIFF")


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name of an accepted image, from its leading bytes; None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for name, magics in SIGNATURES if data.startswith(magics)), None)


@dataclass(frozen=True)
class ImagePolicy:
    """Which local files an image source may name, and how its errors talk about them.

    `roots=None` is the user's own command line (`run --image`, chat's `/image`): any
    readable file, `~` expanded. A batch file is someone else's input: relative paths
    resolve against `base` (the input file's directory), `~` is not expanded, and the
    resolved file (symlinks and `..` followed) must lie under one of `roots`; errors echo
    the source as written, never a resolved path, and say the same for a file outside the
    roots whether it exists or not. `roots=()` accepts no local file at all (a server).
    """

    roots: tuple[Path, ...] | None = None
    base: Path | None = None

    @classmethod
    def confined(cls, base: Path, extra: tuple[Path, ...] = ()) -> ImagePolicy:
        return cls(tuple(Path(r).resolve() for r in (base, *extra)), Path(base).resolve())

    def local_path(self, source: str) -> Path:
        """The file a non-URL source names, once the policy allows it."""
        if source.startswith("file:"):
            parsed = urllib.parse.urlparse(source)
            if parsed.netloc not in ("", "localhost"):
                raise SmallfourError(f"image {source}: file: URLs name a local file (file:///path)")
            text = urllib.request.url2pathname(parsed.path)
        else:
            text = source
        if self.roots is None:
            return Path(text).expanduser()
        if not self.roots:
            raise SmallfourError("image paths are not accepted here; send the image as a data:image/...;base64 URL")
        path = ((self.base or Path.cwd()) / text).resolve()
        if not any(path == root or root in path.parents for root in self.roots):
            raise SmallfourError(f"image {source} is outside the directories images may be read from (the input "
                                 "file's directory; --allow-path DIR adds one)")
        if not path.is_file():
            raise SmallfourError(f"image file {source} does not exist")  # as written: the resolved path is ours
        return path


ANY_FILE = ImagePolicy()


def allowed_source(source: str, policy: ImagePolicy) -> str:
    """What to read for an image source once `policy` allows it: a data: URL as it is, a file as its absolute path."""
    if source.startswith("data:"):
        return source
    _refuse_remote(source)
    return str(policy.local_path(source))


def _refuse_remote(source: str) -> None:
    if source.lower().startswith(("http://", "https://")):
        raise SmallfourError(f"image {source}: http(s) URLs are never fetched; download the file and give its path, "
                             "or send a data: URL")


def read_source(source: str, policy: ImagePolicy = ANY_FILE) -> tuple[str, bytes]:
    """The bytes of an image given as a file path, a `file:` URL or a `data:image/...;base64,` URL."""
    if source.startswith("data:"):
        header, comma, payload = source.partition(",")
        if not comma or ";base64" not in header:
            raise SmallfourError("image data: URL must look like data:image/png;base64,…")
        try:
            return "data: URL", base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise SmallfourError("image data: URL does not hold valid base64") from None
    _refuse_remote(source)
    path = policy.local_path(source)
    # A confined policy's errors name the source as written: the resolved path may be none of the writer's business.
    label = str(path) if policy.roots is None else source
    if not path.exists():
        raise SmallfourError(f"image file {label} does not exist")
    if not path.is_file():
        raise SmallfourError(f"image {label} is not a file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise SmallfourError(f"image {label} is {size / 1e6:.0f} MB, more than the {MAX_FILE_BYTES // 2**20} MiB "
                             "limit")
    try:
        return label, path.read_bytes()
    except OSError as exc:
        raise SmallfourError(f"cannot read image {label}: {exc.strerror or exc}") from None


def prepare_image(source: str, geometry: Geometry = Geometry(), policy: ImagePolicy = ANY_FILE) -> PreparedImage:
    """Decode, validate and normalize one image (path or data: URL) for the model."""
    label, data = read_source(source, policy)
    return prepare_bytes(label, data, geometry)


def prepare_bytes(label: str, data: bytes, geometry: Geometry = Geometry()) -> PreparedImage:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > MAX_FILE_BYTES:
        raise SmallfourError(f"image {label} is more than the {MAX_FILE_BYTES // 2**20} MiB limit")
    kind = sniff_format(data)
    if kind is None:
        raise SmallfourError(f"{label} is not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})")
    with warnings.catch_warnings():
        # Pillow only warns between its own limit and twice it; we refuse all of it.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        pillow_limit = Image.MAX_IMAGE_PIXELS
        try:
            # Our own limit, checked on the header below, gives the clearer message.
            Image.MAX_IMAGE_PIXELS = None
            try:
                image = Image.open(io.BytesIO(data), formats=[kind])  # that one plugin and no other
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
            raise SmallfourError(f"{label} is not a readable {kind} image") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise SmallfourError(f"image {label} is truncated or damaged: {exc}") from None
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animations: the first frame, as mistral-common's Pillow path does
    rgb = _to_rgb(image)
    tokens_x, tokens_y = token_grid(rgb.width, rgb.height, geometry)
    size = (tokens_x * geometry.token_pixels, tokens_y * geometry.token_pixels)
    pixels = rgb.tobytes() if rgb.size == size else cubic_resize(np.asarray(rgb), *size).tobytes()
    return PreparedImage(label, size[0], size[1], pixels, tokens_x, tokens_y)


# OpenCV's bicubic kernel parameter; Pillow's is -0.5.
_CUBIC_A = np.float32(-0.75)
_ROWS_AT_ONCE = 256  # bounds the float copy of a large photo to a few tens of MB


def _cubic_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights (target × 4) of OpenCV's INTER_CUBIC along one axis: pixel centres
    aligned, edge pixels repeated, no widening of the kernel when shrinking."""
    fx = ((np.arange(target) + 0.5) * (1.0 / (target / source)) - 0.5).astype(np.float32)
    start = np.floor(fx).astype(np.int64)
    x = fx - start.astype(np.float32)
    a = _CUBIC_A
    w0 = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
    w1 = ((a + 2) * x - (a + 3)) * x * x + 1
    w2 = ((a + 2) * (1 - x) - (a + 3)) * (1 - x) * (1 - x) + 1
    weights = np.stack([w0, w1, w2, 1 - w0 - w1 - w2], axis=1).astype(np.float32)
    indices = np.clip(start[:, None] + np.arange(-1, 3), 0, source - 1)
    return indices, weights


def cubic_resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """`pixels` (H × W × 3, uint8) resized as mistral-common resizes (OpenCV's INTER_CUBIC on float32
    values), rounded back to uint8. Pillow's bicubic differs: it widens its kernel over the whole
    source footprint when shrinking (antialiasing), which changes what the vision tower sees from a
    photo by about half a normalized unit per pixel on fine detail."""
    columns, column_weights = _cubic_taps(pixels.shape[1], width)
    rows, row_weights = _cubic_taps(pixels.shape[0], height)
    wide = np.zeros((pixels.shape[0], width, pixels.shape[2]), np.float32)
    for top in range(0, pixels.shape[0], _ROWS_AT_ONCE):
        band = pixels[top:top + _ROWS_AT_ONCE].astype(np.float32)
        for tap in range(4):
            wide[top:top + _ROWS_AT_ONCE] += band[:, columns[:, tap]] * column_weights[:, tap, None]
    out = np.zeros((height, width, pixels.shape[2]), np.float32)
    for tap in range(4):
        out += wide[rows[:, tap]] * row_weights[:, tap, None, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


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
