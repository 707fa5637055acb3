"""Images in prompts through llama.cpp's libmtmd (`llama_cpp.mtmd_cpp`).

The chat template writes one `[IMG]` per image. mistral-common expands each into the
image's token grid: `[IMG]`×columns then `[IMG_BREAK]` per row, the last row ending in
`[IMG_END]`. libmtmd produces the same positions for a pixtral projector: one image
chunk (columns×rows embeddings with the `[IMG_BREAK]` embedding between rows) followed
by a text chunk holding `[IMG_END]`. So the prompt is tokenized as text first, each
`[IMG]` is replaced by mistral-common's grid (which is what `--dry-run` and the tests
compare), and at evaluation the image positions are filled with libmtmd's embeddings
instead of token embeddings. llama-cpp-python's `input_ids` holds the grid's ids at
those positions, so its prefix cache and `generate` work on the whole sequence as usual.

Everything that could make libmtmd fail is checked here first (file, header, width of
the embeddings), so users get one line instead of an abort inside llama.cpp.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quant.gguf_io import read_header, read_tensor
from smallfour.errors import SmallfourError
from smallfour.images import ANY_FILE, Geometry, ImagePolicy, PreparedImage, allowed_source, prepare_image

if TYPE_CHECKING:
    from smallfour.model import Model

IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")


@dataclass
class Projector:
    """An open libmtmd context for one model."""

    path: Path
    ctx: object  # mtmd_context_p
    geometry: Geometry
    n_embd: int
    img_break: object  # np.ndarray (n_embd,): the [IMG_BREAK] embedding, to repair libmtmd's break rows

    def close(self) -> None:
        import llama_cpp.mtmd_cpp as mtmd

        if self.ctx:
            mtmd.mtmd_free(self.ctx)
            self.ctx = None


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's grid sits in the prompt token list."""

    start: int
    image: PreparedImage

    @property
    def n_tokens(self) -> int:
        return self.image.n_tokens

    @property
    def digest(self) -> bytes:
        """What tells two images apart in the cache (their grids' token ids can be equal)."""
        return hashlib.blake2b(self.image.rgb + f"{self.image.width}x{self.image.height}".encode(),
                               digest_size=16).digest()

    def decode(self, model: Model, tokens: list[int], seq: int) -> None:
        decode_image(model, self, tokens, seq)


def find_mmproj(model: Path, explicit: Path | None) -> Path:
    """The projector to use: `--mmproj`, else the one beside the model (`<stem>-mmproj.gguf`, …)."""
    if explicit is not None:
        explicit = Path(explicit)
        if not explicit.is_file():
            raise SmallfourError(f"mmproj file {explicit} does not exist")
        return explicit
    from smallfour.store import mmproj_for

    found = mmproj_for(Path(model))
    if found is None:
        raise SmallfourError(f"images need a vision projector, and {Path(model).name} has none beside it "
                             f"(expected {Path(model).stem}-mmproj.gguf; convert without --no-mmproj or give "
                             "--mmproj PATH)")
    return found


def read_projector_header(path: Path) -> tuple[dict, set[str]]:
    header = read_header(path, what="mmproj")
    return header.fields, {tensor.name for tensor in header.tensors}


def check_projector(path: Path, n_embd: int) -> Geometry:
    """The image geometry of a pixtral mmproj that fits a model of width `n_embd`, or a clear error."""
    fields, tensors = read_projector_header(path)
    if fields.get("general.architecture") != "clip" or not fields.get("clip.has_vision_encoder"):
        raise SmallfourError(f"{path.name} is not a vision projector (mmproj) GGUF")
    projector = fields.get("clip.projector_type") or fields.get("clip.vision.projector_type")
    if projector != "pixtral":
        raise SmallfourError(f"{path.name} is a {projector!r} projector; Mistral Small 4 needs a pixtral one")
    width = fields.get("clip.vision.projection_dim")
    if width != n_embd:
        raise SmallfourError(f"{path.name} does not belong to this model: it makes {width}-wide image embeddings, "
                             f"the model's are {n_embd} wide")
    if "v.token_embd.img_break" not in tensors:
        raise SmallfourError(f"{path.name} lacks v.token_embd.img_break (the [IMG_BREAK] embedding); "
                             "reconvert it with smallfour convert")
    return Geometry(patch_size=int(fields["clip.vision.patch_size"]),
                    spatial_merge=int(fields.get("clip.vision.spatial_merge_size", 1)),
                    max_image_size=int(fields["clip.vision.image_size"]))


def open_projector(model: Model, path: Path, *, n_threads: int | None = None, use_gpu: bool = True) -> Projector:
    """libmtmd context for `model` from the mmproj at `path` (freed with the model)."""
    import llama_cpp.mtmd_cpp as mtmd

    from smallfour.model import llama_log_callback

    path = Path(path)
    geometry = check_projector(path, model.n_embd)
    # libmtmd logs on its own channel; send it through the same -v switch as llama.cpp's.
    callback = llama_log_callback()
    mtmd.mtmd_log_set(callback, ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(callback, ctypes.c_void_p(0))
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = use_gpu
    params.print_timings = False
    params.n_threads = n_threads or os.cpu_count() or 1
    params.warmup = False  # a warm-up at the maximum image size would cost seconds for nothing
    # Every size mistral-common allows, unchanged: libmtmd's own pixtral limits (8 to 1024
    # tokens) would resize images again and change the token count.
    max_side = geometry.max_image_size // geometry.token_pixels
    params.image_min_tokens = 1
    params.image_max_tokens = max_side * max_side
    ctx = mtmd.mtmd_init_from_file(str(path).encode(), model.model_pointer, params)
    if not ctx:
        raise SmallfourError(f"llama.cpp could not load the vision projector {path.name} (run with -v for its log)")
    if not mtmd.mtmd_support_vision(ctx):
        mtmd.mtmd_free(ctx)
        raise SmallfourError(f"{path.name} has no vision encoder")
    return Projector(path, ctx, geometry, model.n_embd, _read_img_break(path))


def _read_img_break(path: Path):
    import numpy as np

    return np.asarray(read_tensor(read_header(path), "v.token_embd.img_break"), dtype=np.float32).reshape(-1)


def image_ids(control: dict[str, int]) -> tuple[int, int, int]:
    missing = [t for t in IMAGE_TOKENS if t not in control]
    if missing:
        raise SmallfourError(f"the model's vocabulary has no {', '.join(missing)}: it cannot take images")
    img, brk, end = (control[t] for t in IMAGE_TOKENS)
    return img, brk, end


def grid_tokens(image: PreparedImage, ids: tuple[int, int, int]) -> list[int]:
    """mistral-common's tokens for one image: rows of [IMG], [IMG_BREAK] between rows, [IMG_END] last."""
    img, brk, end = ids
    tokens = ([img] * image.tokens_x + [brk]) * image.tokens_y
    tokens[-1] = end
    return tokens


def expand_images(tokens: list[int], images: list[PreparedImage], ids: tuple[int, int, int]) -> tuple[list[int],
                                                                                                     list[ImageSpan]]:
    """Replace the template's i-th `[IMG]` with image i's grid; the spans say where each went."""
    places = [i for i, t in enumerate(tokens) if t == ids[0]]
    if len(places) != len(images):
        raise SmallfourError(f"the prompt has {len(places)} image place(s) for {len(images)} image(s)")
    out: list[int] = []
    spans: list[ImageSpan] = []
    previous = 0
    for place, image in zip(places, images, strict=True):
        out += tokens[previous:place]
        spans.append(ImageSpan(len(out), image))
        out += grid_tokens(image, ids)
        previous = place + 1
    out += tokens[previous:]
    return out, spans


def prepare_all(sources: list[str], geometry: Geometry | None = None,
                policy: ImagePolicy = ANY_FILE) -> list[PreparedImage]:
    return [prepare_image(s, geometry or Geometry(), policy) for s in sources]


def _chunks_for(projector: Projector, image: PreparedImage):
    """libmtmd's chunks for one image alone: the image chunk, then `[IMG_END]` as text."""
    import llama_cpp.mtmd_cpp as mtmd

    data = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
    bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, data)
    if not bitmap:
        raise SmallfourError(f"llama.cpp could not take image {image.label}")
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        text = mtmd.mtmd_input_text()
        marker = mtmd.mtmd_default_marker()
        text.text, text.text_len = marker, len(marker)
        text.add_special, text.parse_special = False, True
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        result = mtmd.mtmd_tokenize(projector.ctx, chunks, ctypes.byref(text), bitmaps, 1)
    finally:
        mtmd.mtmd_bitmap_free(bitmap)
    if result != 0:
        mtmd.mtmd_input_chunks_free(chunks)
        raise SmallfourError(f"llama.cpp could not tokenize image {image.label} (error {result})")
    return chunks


def encode_image(projector: Projector, image: PreparedImage):
    """The embeddings libmtmd computes for one image (rows: grid cells with [IMG_BREAK] rows between).

    For tests and inspection; prompts go through `Model.prefill`.
    """
    import llama_cpp.mtmd_cpp as mtmd

    chunks = _chunks_for(projector, image)
    try:
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                return _encode_chunk(projector, chunk, image)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
    raise SmallfourError(f"llama.cpp produced no image chunk for {image.label}")


def _encode_chunk(projector: Projector, chunk, image: PreparedImage):
    """libmtmd's embeddings of an image chunk, with the [IMG_BREAK] rows set right.

    libmtmd (models/pixtral.cpp) builds the break rows as `0 × (uninitialized memory) + img_break`:
    when the memory happens to hold NaN or Inf, so do the rows, and the whole answer turns to NaN.
    Seen here about once in a few dozen images. So the image is encoded here, those rows are
    overwritten with the embedding from the mmproj, and the result decoded with
    `mtmd_helper_decode_image_chunk`.
    """
    import numpy as np
    import llama_cpp.mtmd_cpp as mtmd

    n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
    if n != image.n_tokens - 1:
        raise SmallfourError(f"internal error: libmtmd laid image {image.label} out over {n + 1} positions, "
                             f"mistral-common over {image.n_tokens}")
    if mtmd.mtmd_encode_chunk(projector.ctx, chunk) != 0:
        raise SmallfourError(f"llama.cpp could not encode image {image.label}")
    pointer = mtmd.mtmd_get_output_embd(projector.ctx)
    embd = np.ctypeslib.as_array(pointer, shape=(n * projector.n_embd,)).reshape(n, projector.n_embd).copy()
    embd[image.tokens_x::image.tokens_x + 1] = projector.img_break
    if not np.isfinite(embd).all():
        raise SmallfourError(f"llama.cpp computed non-finite embeddings for image {image.label}")
    return embd


def decode_image(model: Model, span: ImageSpan, tokens: list[int], seq: int) -> None:
    """One image's chunks into sequence `seq` at its end: the embeddings, then `[IMG_END]`.

    The positions get the grid's token ids (`tokens[span.start:…]`) in the sequence's cache.
    """
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    projector = projector_of(model)
    chunks = _chunks_for(projector, span.image)
    try:
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t()
                pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                text = [pointer[j] for j in range(count.value)]
                if text:
                    model.decode(text, seq=seq)
                continue
            start = len(model.caches[seq].tokens)
            if start + mtmd.mtmd_input_chunk_get_n_tokens(chunk) >= model.n_ctx_seq:
                raise SmallfourError(f"image {span.image.label} does not fit in the context "
                                     f"({model.n_ctx_seq} tokens)")
            embd = _encode_chunk(projector, chunk, span.image)
            new_n_past = llama_cpp.llama_pos(0)
            result = mtmd.mtmd_helper_decode_image_chunk(
                projector.ctx, model.context, chunk, embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                llama_cpp.llama_pos(start), llama_cpp.llama_seq_id(seq), model.n_batch, ctypes.byref(new_n_past),
                ctypes.cast(None, mtmd.mtmd_helper_post_decode_callback), None)
            if result != 0:
                raise SmallfourError(f"llama.cpp could not evaluate image {span.image.label} (error {result})")
            model.extend_after_image(seq, tokens[start:new_n_past.value])
    finally:
        mtmd.mtmd_input_chunks_free(chunks)


def image_source(part: dict) -> str | None:
    """The path or data: URL of an image content part (OpenAI `image_url`, or `image`), else None."""
    kind = part.get("type")
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
    elif kind == "image":
        url = part.get("image", part.get("url", part.get("path")))
    else:
        return None
    if not isinstance(url, str) or not url:
        raise SmallfourError(f"an {kind} content part needs a file path or data: URL")
    return url


def image_sources(messages: list[dict]) -> list[str]:
    """Every image in the conversation, in the order the chat template writes their [IMG]."""
    sources = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            sources += [s for part in content if isinstance(part, dict) and (s := image_source(part)) is not None]
    return sources


def confine_images(messages: list[dict], policy: ImagePolicy) -> list[dict]:
    """`messages` with every image checked against `policy` before anything reads it.

    Local paths become the absolute files the policy allowed (so a relative path means the
    same wherever the job runs), URLs that are never fetched and paths outside the
    policy's roots raise one-line errors; data: URLs pass unchanged (their content is
    checked when decoded).
    """
    def confined(part: Any) -> Any:
        source = image_source(part) if isinstance(part, dict) else None
        if source is None or source.startswith("data:"):
            return part
        return {"type": "image_url", "image_url": {"url": allowed_source(source, policy)}}

    return [{**m, "content": [confined(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages]


def with_images(text: str, sources: list[str]) -> str | list[dict]:
    """A user turn's content: the text alone, or image parts first and the text after them."""
    if not sources:
        return text
    return [*({"type": "image_url", "image_url": {"url": s}} for s in sources), {"type": "text", "text": text}]


def attach_projector(model: Model, projector: Projector | None = None, *, error: str | None = None) -> None:
    """Give `model` its projector, or the reason it has none (reported when an image needs one)."""
    if model.projector is not None and model.projector is not projector:
        model.projector.close()
    model.projector, model.projector_error = projector, error


def projector_of(model: Model) -> Projector:
    if model.projector is None:
        raise SmallfourError(model.projector_error
                             or "images need a vision projector (mmproj); none is loaded (give --mmproj PATH)")
    return model.projector


def expand_request(model: Model, messages: list[dict], tokens: list[int]) -> tuple[list[int], list[ImageSpan]]:
    """Prompt tokens with every image's grid in place of its [IMG], and where each image went."""
    sources = image_sources(messages)
    if not sources:
        return tokens, []
    projector = model.projector
    images = prepare_all(sources, projector.geometry if projector is not None else None)
    return expand_images(tokens, images, image_ids(model.control_tokens))


def model_width(model: Path) -> int:
    """The model's embedding width, from its GGUF header (nothing loaded)."""
    return int(read_header(Path(model)).arch_field("embedding_length"))


def check_images(model: Path, messages: list[dict], mmproj: Path | None) -> Path | None:
    """Before anything loads: every image decodes, and a projector that fits the model is there.

    Returns the projector to load, or None when the conversation has no image.
    """
    sources = image_sources(messages)
    if not sources:
        return None
    prepare_all(sources)
    path = find_mmproj(Path(model), mmproj)
    check_projector(path, model_width(model))
    return path


def attach_images(messages: list[dict], sources: list[str]) -> list[dict]:
    """`messages` with image parts added to the last user turn (for --image and /image)."""
    if not sources:
        return messages
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user":
            break
    else:
        raise SmallfourError("--image needs a user message to attach the image to")
    message = dict(messages[index])
    content = message.get("content")
    if isinstance(content, list):
        message["content"] = [*({"type": "image_url", "image_url": {"url": s}} for s in sources), *content]
    else:
        message["content"] = with_images(content or "", sources)
    return [*messages[:index], message, *messages[index + 1:]]
