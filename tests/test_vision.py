"""Vision: the mmproj converter, images through libmtmd, and image prompts in run / chat / batch.

Independent references only:
* llama.cpp's own `convert_hf_to_gguf.py --mmproj` (from the llama-cpp-python sdist) for the
  mmproj's tensors and metadata;
* transformers' Pixtral tower + Mistral3 projector for the image embeddings libmtmd computes;
* mistral-common's `encode_chat_completion` for the token sequence of prompts with images.
Images are fresh random pixels (the seed is printed on failure).
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from conftest import FP8_BLOCK, HF, NATIVE, NATIVE_FP8, REPO
from convert.checkpoint import open_checkpoint
from convert.mmproj import convert_mmproj
from helpers import assert_one_line_error, line_error, run_cli, stats_numbers

SDIST_VERSION = "0.3.36"
# Keys that name the file rather than describe the network.
NAMING_KEYS = {"general.name", "general.basename", "general.finetune", "general.size_label"}


# --------------------------------------------------------------------------- helpers


def fresh_rng() -> tuple[np.random.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def png_bytes(array: np.ndarray, mode: str | None = None, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    (Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)).save(buffer, fmt, **save)
    return buffer.getvalue()


def random_png(rng: np.random.Generator, width: int, height: int) -> bytes:
    return png_bytes(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def read_gguf(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.") and k not in NAMING_KEYS}
    tensors = {t.name: (t.tensor_type, tuple(int(d) for d in t.shape), np.array(t.data)) for t in reader.tensors}
    return meta, tensors


@pytest.fixture(scope="session")
def llama_cpp_source() -> Path:
    """llama.cpp as vendored by the llama-cpp-python sdist we run (its reference converter and gguf-py)."""
    candidates = [Path(os.environ.get("SMALLFOUR_LLAMA_CPP_SDIST", "/nonexistent")),
                  Path(f"/tmp/sdist/llama_cpp_python-{SDIST_VERSION}"),
                  REPO / ".cache" / "sdist" / f"llama_cpp_python-{SDIST_VERSION}"]
    for candidate in candidates:
        if (candidate / "vendor/llama.cpp/convert_hf_to_gguf.py").is_file():
            return candidate / "vendor/llama.cpp"
    target = REPO / ".cache" / "sdist"
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={SDIST_VERSION}", "-d", str(target)], check=True, capture_output=True)
    subprocess.run(["tar", "xzf", f"llama_cpp_python-{SDIST_VERSION}.tar.gz"], cwd=target, check=True)
    return candidates[-1] / "vendor/llama.cpp"


def reference_mmproj(source: Path, checkpoint: Path, output: Path, outtype: str, native: bool) -> Path:
    command = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(checkpoint), "--mmproj",
               "--outtype", outtype, "--outfile", str(output)]
    if native:
        command.append("--mistral-format")
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py"), "NO_LOCAL_GGUF": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def ours(checkpoint: Path, output: Path, kind: str = "f16") -> Path:
    ckpt = open_checkpoint(checkpoint)
    try:
        convert_mmproj(ckpt, output, kind)
    finally:
        ckpt.close()
    return output


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize(("spec", "kind"), [(HF, "f16"), (NATIVE, "f16"), (NATIVE, "q8_0")],
                         ids=["hf-f16", "native-f16", "native-q8_0"])
def test_mmproj_equals_llama_cpp_reference(checkpoint, llama_cpp_source, tmp_path, spec, kind):
    native = spec.layout == "native"
    reference = reference_mmproj(llama_cpp_source, checkpoint(spec), tmp_path / "ref.gguf", kind, native)
    mine = ours(checkpoint(spec), tmp_path / "ours.gguf", kind)
    ref_meta, ref_tensors = read_gguf(reference)
    our_meta, our_tensors = read_gguf(mine)

    # The reference HF path drops the [IMG_BREAK] row (it filters text tensors before it looks for it),
    # and libmtmd then refuses the file; the Mistral path keeps it. Ours has it from both layouts.
    assert ("v.token_embd.img_break" in ref_tensors) == native
    assert set(our_tensors) == set(ref_tensors) | {"v.token_embd.img_break"}
    for name, (qtype, shape, data) in ref_tensors.items():
        assert our_tensors[name][0] == qtype, name
        assert our_tensors[name][1] == shape, name
        np.testing.assert_array_equal(our_tensors[name][2], data, err_msg=name)
    with _opened(checkpoint(spec)) as ckpt:
        embed = "tok_embeddings.weight" if native else "language_model.model.embed_tokens.weight"
        np.testing.assert_array_equal(our_tensors["v.token_embd.img_break"][2], ckpt.read(embed)[12])

    # Metadata: the same keys and values, except two places where the two reference paths disagree
    # with each other and we follow transformers' Pixtral: RMSNorm eps 1e-5 (the Mistral path writes
    # the text model's norm_eps), and the RoPE base written out (the HF path leaves libmtmd's default).
    eps_key, rope_key = "clip.vision.attention.layer_norm_epsilon", "clip.rope.freq_base"
    assert our_meta.pop(eps_key) == pytest.approx(1e-5)
    assert ref_meta.pop(eps_key) == pytest.approx(json.loads((checkpoint(spec) / "params.json").read_text())["norm_eps"]
                                                  if native else 1e-5)
    assert our_meta.pop(rope_key) == 10000.0 == ref_meta.pop(rope_key, 10000.0)
    assert our_meta == ref_meta


class _opened:
    def __init__(self, path: Path):
        self.ckpt = open_checkpoint(path)

    def __enter__(self):
        return self.ckpt

    def __exit__(self, *exc):
        self.ckpt.close()


@pytest.mark.parametrize(("fp8", "plain"), [(FP8_BLOCK, HF), (NATIVE_FP8, NATIVE)], ids=["hf-fp8", "native-fp8"])
def test_fp8_checkpoints_give_the_same_mmproj(checkpoint, tmp_path, fp8, plain):
    # Vision weights and embeddings stay BF16 in the FP8 releases: the projector must come out identical.
    _, a = read_gguf(ours(checkpoint(fp8), tmp_path / "fp8.gguf"))
    _, b = read_gguf(ours(checkpoint(plain), tmp_path / "plain.gguf"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name][2], b[name][2], err_msg=name)


def test_convert_cli_mmproj_options(checkpoint, tmp_path):
    source = checkpoint(HF)
    out = tmp_path / "m.gguf"
    result = run_cli("convert", source, "-o", out, "--recipe", "q8_0", "--mmproj-type", "q8_0")
    assert result.returncode == 0, result.stderr
    assert "m-mmproj.gguf (vision projector" in result.stderr
    _, tensors = read_gguf(tmp_path / "m-mmproj.gguf")
    assert tensors["v.blk.0.attn_q.weight"][0] == gguf.GGMLQuantizationType.Q8_0
    assert tensors["v.patch_embd.weight"][0] == gguf.GGMLQuantizationType.F32  # as the reference keeps it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-mmproj.gguf", "m.gguf"]

    # An existing projector is not overwritten, and is noticed before the model is written.
    again = run_cli("convert", source, "-o", tmp_path / "n.gguf", "--recipe", "q8_0",
                    "--mmproj", tmp_path / "m-mmproj.gguf")
    assert_one_line_error(again, "m-mmproj.gguf already exists", "--force")
    assert not (tmp_path / "n.gguf").exists()

    skipped = run_cli("convert", source, "-o", tmp_path / "n.gguf", "--recipe", "q8_0", "--no-mmproj")
    assert skipped.returncode == 0 and "vision projector" not in skipped.stderr
    assert not (tmp_path / "n-mmproj.gguf").exists()

    assert_one_line_error(run_cli("convert", source, "-o", tmp_path / "o.gguf", "--no-mmproj", "--mmproj", "x"),
                          "either --no-mmproj or --mmproj")
    assert_one_line_error(run_cli("convert", source, "-o", tmp_path / "o.gguf", "--mmproj-type", "q4_k"),
                          "unknown mmproj type 'q4_k'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-mmproj.gguf", "m.gguf", "n.gguf"]


# --------------------------------------------------------------------------- libmtmd against references


@pytest.fixture(scope="module")
def vision_llm(converted, tmp_path_factory, checkpoint):
    """The q8_0 fixture model with an F32 projector (so the comparison measures libmtmd, not rounding)."""
    from smallfour.model import Model
    from smallfour.vision import attach_projector, open_projector

    mmproj = ours(checkpoint(HF), tmp_path_factory.mktemp("mmproj") / "f32-mmproj.gguf", "f32")
    with Model.load(converted(HF, "q8_0"), n_ctx=8192) as model:
        attach_projector(model, open_projector(model, mmproj))
        yield model


@pytest.fixture(scope="module")
def transformers_model(checkpoint, tmp_path_factory):
    from reference import reference_model

    return reference_model(checkpoint(HF), tmp_path_factory.mktemp("reference"))


def test_image_embeddings_match_transformers(vision_llm, transformers_model):
    from smallfour.images import prepare_bytes
    from smallfour.vision import encode_image

    rng, seed = fresh_rng()
    model = transformers_model
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
    img_break = model.get_input_embeddings().weight[12].detach().numpy()
    worst = worst_abs = 0.0
    for _ in range(3):
        width, height = (int(v) for v in rng.integers(20, 200, 2))
        image = prepare_bytes("random", random_png(rng, width, height))
        ours_ = encode_image(vision_llm.projector, image)
        # Rows: each grid row's cells, then one [IMG_BREAK] row between grid rows.
        assert ours_.shape == ((image.tokens_x + 1) * image.tokens_y - 1, 128)
        cells = np.delete(ours_, np.arange(image.tokens_x, len(ours_), image.tokens_x + 1), axis=0)
        breaks = ours_[image.tokens_x::image.tokens_x + 1]
        # The same preprocessed pixels: the RGB bytes handed to libmtmd, normalized as libmtmd does.
        pixels = torch.frombuffer(bytearray(image.rgb), dtype=torch.uint8).view(image.height, image.width, 3)
        pixels = ((pixels.permute(2, 0, 1).float() / 255.0 - mean) / std)[None]
        with torch.no_grad():
            expected = model.model.get_image_features(
                pixels, image_sizes=torch.tensor([[image.height, image.width]])).pooler_output[0].numpy()
        assert cells.shape == expected.shape
        error = np.abs(cells - expected).max() / np.abs(expected).max()
        worst = max(worst, error)
        worst_abs = max(worst_abs, float(np.abs(cells - expected).max()))
        assert error < 2e-3, f"seed {seed}, {width}×{height}: relative error {error:.2e}"
        np.testing.assert_allclose(breaks, np.broadcast_to(img_break, breaks.shape), rtol=0, atol=1e-6,
                                   err_msg=f"seed {seed}, {width}×{height}")
    print(f"embeddings: max abs error {worst_abs:.2e}, max relative error {worst:.2e} (seed {seed})")


def test_break_rows_are_repaired_when_libmtmd_leaves_them_poisoned(vision_llm, monkeypatch):
    """libmtmd's [IMG_BREAK] rows are `0 × uninitialized + img_break`: NaN when the memory holds NaN.

    The rows are poisoned on purpose here, in libmtmd's own output buffer, so the repair is tested
    every run rather than when the memory happens to be dirty.
    """
    import llama_cpp.mtmd_cpp as mtmd

    from smallfour.images import prepare_bytes
    from smallfour.vision import encode_image

    rng, seed = fresh_rng()
    image = prepare_bytes("random", random_png(rng, 90, 70))  # 4 columns × 3 rows: 2 break rows
    clean = encode_image(vision_llm.projector, image)
    breaks = np.arange(image.tokens_x, len(clean), image.tokens_x + 1)
    assert len(breaks) == image.tokens_y - 1 == 2
    real = mtmd.mtmd_get_output_embd

    def poisoned(ctx):
        pointer = real(ctx)
        rows = np.ctypeslib.as_array(pointer, shape=clean.shape)  # libmtmd's buffer itself
        rows[breaks] = np.nan
        rows[breaks[-1], ::3] = np.inf
        return pointer

    monkeypatch.setattr(mtmd, "mtmd_get_output_embd", poisoned)
    repaired = encode_image(vision_llm.projector, image)
    img_break = np.array(next(t.data for t in gguf.GGUFReader(vision_llm.projector.path).tensors
                              if t.name == "v.token_embd.img_break"), dtype=np.float32).reshape(-1)
    np.testing.assert_array_equal(repaired[breaks], np.broadcast_to(img_break, (len(breaks), len(img_break))))
    # Only the break rows change: every grid cell is libmtmd's, bit for bit (seed printed on failure).
    np.testing.assert_array_equal(np.delete(repaired, breaks, axis=0), np.delete(clean, breaks, axis=0),
                                  err_msg=f"seed {seed}")


def mistral_tokens(tokenizer: MistralTokenizer, messages: list[dict]) -> list[int]:
    """mistral-common's token ids, through its real image pipeline (OpenCV resize included)."""
    return tokenizer.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens


@pytest.fixture(scope="module")
def mistral(checkpoint):
    return MistralTokenizer.from_file(str(checkpoint(HF) / "tekken.json"))


# (width, height): tiny, exact multiples, odd sizes, wider and taller than the 1540 px maximum.
# Scaled down, 3000×111 becomes 1540×56.98: rounded (57 px, 3 rows) not truncated (56 px, 2 rows);
# 3080×113 becomes exactly 1540×56.5: Python's round-half-even (56 px, 2 rows), not half-up (3 rows).
SIZES = [(1, 1), (28, 28), (57, 30), (100, 333), (3000, 120), (1700, 1600), (3000, 111), (3080, 113), (113, 3080)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_image_token_count_matches_mistral_common(vision_llm, mistral, size):
    from smallfour.generation import prompt_tokens, resolve_request
    from smallfour.images import prepare_bytes
    from smallfour.vision import _chunks_for

    rng, _ = fresh_rng()
    data = random_png(rng, *size)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data)}},
                                             {"type": "text", "text": "What is it?"}]}]
    expected = mistral_tokens(mistral, messages)
    _, tokens = prompt_tokens(vision_llm, resolve_request(messages))
    assert tokens == expected

    # libmtmd lays the same image out over the same positions: its chunk plus the [IMG_END] text.
    import llama_cpp.mtmd_cpp as mtmd

    image = prepare_bytes("random", data)
    chunks = _chunks_for(vision_llm.projector, image)
    try:
        counts = [mtmd.mtmd_input_chunk_get_n_tokens(mtmd.mtmd_input_chunks_get(chunks, i))
                  for i in range(mtmd.mtmd_input_chunks_size(chunks))]
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
    grid = sum(1 for t in expected if t in (10, 12, 13))
    assert sum(counts) == image.n_tokens == grid
    print(size, "→", grid, "tokens")


# Enlarged (to whole 28-pixel tokens) and shrunk (the longest side to 1540) images. mistral-common
# resizes with OpenCV's INTER_CUBIC on float32 values and keeps fractions and cubic overshoot beyond
# 0…255; we hand libmtmd uint8, so we compare with mistral-common's values clipped to that range:
# what is left is rounding, up to 0.5 / 255 / 0.261 ≈ 0.0075 per value. Measured on random noise:
# mean |difference| 0.0036 (unclipped 0.0066). Bar 0.005. Pillow's bicubic, used before,
# measured 0.06 when enlarging and 0.47 when shrinking.
RESIZED = [(57, 30), (100, 333), (300, 200), (1700, 90), (1600, 1601)]


@pytest.mark.parametrize("size", RESIZED, ids=[f"{w}x{h}" for w, h in RESIZED])
def test_pixels_match_mistral_common(mistral, size):
    from smallfour.images import prepare_bytes

    rng, seed = fresh_rng()
    data = random_png(rng, *size)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data)}},
                                             {"type": "text", "text": "What is it?"}]}]
    (expected,) = mistral.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).images
    image = prepare_bytes("random", data)
    assert expected.shape == (3, image.height, image.width)
    mean = np.array((0.48145466, 0.4578275, 0.40821073), np.float32).reshape(3, 1, 1)
    std = np.array((0.26862954, 0.26130258, 0.27577711), np.float32).reshape(3, 1, 1)
    pixels = np.frombuffer(image.rgb, np.uint8).reshape(image.height, image.width, 3).transpose(2, 0, 1)
    representable = np.clip(expected, (0 - mean) / std, (1 - mean) / std)
    difference = float(np.abs((pixels / np.float32(255) - mean) / std - representable).mean())
    assert difference < 0.005, f"seed {seed}, {size}: mean |difference| {difference:.4f}"


def test_cubic_resize_is_opencvs():
    """Against OpenCV itself, on fresh random sizes both ways: equal up to rounding to uint8."""
    import cv2

    from smallfour.images import cubic_resize

    rng, seed = fresh_rng()
    for _ in range(6):
        width, height = (int(v) for v in rng.integers(1, 700, 2))
        target = (int(rng.integers(1, 1200)), int(rng.integers(1, 1200)))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        ours = cubic_resize(pixels, *target).astype(np.float32)
        theirs = np.clip(cv2.resize(pixels.astype(np.float32), target, interpolation=cv2.INTER_CUBIC), 0, 255)
        # 0.5 is rounding; the rest float32 arithmetic in another order (measured up to 0.05).
        assert float(np.abs(ours - theirs).max()) <= 0.6, f"seed {seed}: {width}x{height} → {target}"


def test_several_images_across_turns_match_mistral_common(vision_llm, mistral):
    from smallfour.generation import prompt_tokens, resolve_request

    rng, _ = fresh_rng()
    urls = [data_url(random_png(rng, *size)) for size in [(90, 40), (40, 90), (200, 60)]]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                     {"type": "image_url", "image_url": {"url": urls[0]}},
                                     {"type": "image_url", "image_url": {"url": urls[1]}}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                     {"type": "image_url", "image_url": {"url": urls[2]}}]},
    ]
    _, tokens = prompt_tokens(vision_llm, resolve_request(messages))
    assert tokens == mistral_tokens(mistral, messages)


def test_image_positions_are_cached_by_pixels_not_ids(vision_llm):
    """Two images of one size have the same token ids: the cache must tell them apart by pixels."""
    from smallfour.generation import complete, prompt_with_images, resolve_request

    rng, seed = fresh_rng()
    urls = [data_url(random_png(rng, 84, 56)) for _ in range(2)]

    def request(url: str | None):
        content = "Describe." if url is None else [{"type": "image_url", "image_url": {"url": url}},
                                                    {"type": "text", "text": "Describe."}]
        return resolve_request([{"role": "user", "content": content}], temperature=0.0, max_tokens=4)

    def last_logits(url: str | None, fresh: bool) -> np.ndarray:
        if fresh:
            vision_llm.reset()
        _, tokens, spans = prompt_with_images(vision_llm, request(url))
        vision_llm.prefill(tokens, spans)
        return vision_llm.logits().copy()

    first = last_logits(urls[0], fresh=True)
    complete(vision_llm, request(urls[0]))  # leaves the first image and a reply in the cache
    second_after_first = last_logits(urls[1], fresh=False)
    second = last_logits(urls[1], fresh=True)
    np.testing.assert_allclose(second_after_first, second, rtol=0, atol=1e-4 * np.abs(second).max())
    assert np.abs(first - second).max() > 1e-3 * np.abs(second).max(), f"seed {seed}: the image changes nothing"
    # The same image again: its positions come from the cache and give the same logits.
    again = last_logits(urls[1], fresh=False)
    np.testing.assert_allclose(again, second, rtol=0, atol=1e-4 * np.abs(second).max())
    assert complete(vision_llm, request(urls[1])).tokens == complete(vision_llm, request(urls[1])).tokens


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def model(converted):
    """The q8_0 fixture with the F16 projector `convert` wrote beside it."""
    path = converted(HF, "q8_0")
    assert path.with_name(path.stem + "-mmproj.gguf").is_file()
    return path


@pytest.fixture
def picture(tmp_path) -> Path:
    rng, _ = fresh_rng()
    path = tmp_path / "picture.png"
    path.write_bytes(random_png(rng, 120, 80))
    return path


def test_run_with_images_end_to_end(model, picture, tmp_path):
    args = ["-p", "What is in the picture?", "--json", "--temperature", "0", "-n", "8", "--seed", "1"]
    plain = run_cli("run", model, *args)
    seen = run_cli("run", model, *args, "--image", picture)
    assert plain.returncode == 0 and seen.returncode == 0, plain.stderr + seen.stderr
    plain_out, seen_out = json.loads(plain.stdout), json.loads(seen.stdout)
    grid = (120 // 28 + 1 + 1) * (80 // 28 + 1)  # 5 columns + [IMG_BREAK], 3 rows
    assert seen_out["usage"]["prompt_tokens"] == plain_out["usage"]["prompt_tokens"] - 1 + grid + 1  # [IMG] → grid
    assert seen_out["content"] != plain_out["content"]

    other = tmp_path / "other.jpg"
    Image.open(picture).convert("RGB").save(other, "JPEG")
    both = run_cli("run", model, *args, "--image", picture, "--image", other)
    assert both.returncode == 0, both.stderr
    assert json.loads(both.stdout)["usage"]["prompt_tokens"] == seen_out["usage"]["prompt_tokens"] + grid

    dry = run_cli("run", model, "-p", "x", "--image", picture, "--dry-run", "--json")
    assert json.loads(dry.stdout)["prompt"].count("[IMG]") == 1


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge greyscale image, with a tiny compressed body."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = zlib.compress(b"\0" * (width + 1) * 16, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def foreign_mmproj(source: Path, target: Path, width: int) -> Path:
    """`source` rewritten for a text model `width` wide: what another model's projector looks like."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, "clip")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = width if key == "clip.vision.projection_dim" else field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kind)
    rng = np.random.default_rng(0)
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if tensor.name in ("mm.1.weight", "mm.2.weight", "v.token_embd.img_break"):
            shape = {"mm.1.weight": (width, data.shape[-1]), "mm.2.weight": (width, width),
                     "v.token_embd.img_break": (width,)}[tensor.name] if data.ndim > 1 else (width,)
            data = (0.02 * rng.standard_normal(shape)).astype(data.dtype)
        writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def test_image_errors_are_one_line(model, picture, tmp_path):
    def run(*args: object):
        return run_cli("run", model, "-p", "x", "-n", "2", *args)

    assert_one_line_error(run("--image", tmp_path / "missing.png"), "image file", "missing.png", "does not exist")
    text = tmp_path / "notes.png"
    text.write_text("just words, not pixels")
    assert_one_line_error(run("--image", text), "notes.png is not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(picture.read_bytes()[: picture.stat().st_size // 2])
    assert_one_line_error(run("--image", truncated), "cut.png is truncated or damaged")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(30000, 30000))
    assert bomb.stat().st_size < 10_000
    assert_one_line_error(run("--image", bomb), "30000×30000", "decompression bomb")

    foreign = foreign_mmproj(model.with_name(model.stem + "-mmproj.gguf"), tmp_path / "foreign-mmproj.gguf", 256)
    assert_one_line_error(run("--image", picture, "--mmproj", foreign), "does not belong to this model",
                          "256-wide", "128 wide")
    assert_one_line_error(run("--image", picture, "--mmproj", tmp_path / "nowhere.gguf"),
                          "mmproj file", "does not exist")
    lonely = tmp_path / "lonely" / "model.gguf"
    lonely.parent.mkdir()
    lonely.symlink_to(model)
    assert_one_line_error(run_cli("run", lonely, "-p", "x", "--image", picture), "need a vision projector",
                          "model-mmproj.gguf", "--mmproj")


# --------------------------------------------------------------------------- batch and chat


def test_batch_lines_with_images(model, picture, tmp_path, mistral):
    rng, _ = fresh_rng()

    def messages(url: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "text", "text": "Describe."},
                                             {"type": "image_url", "image_url": {"url": url}}]}]

    def line(custom_id: str, url: str) -> str:
        body = {"messages": messages(url), "max_tokens": 4, "temperature": 0}
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})

    small = data_url(random_png(rng, 56, 56))
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([line("path", str(picture)), line("data", small),
                                 line("missing", str(tmp_path / "gone.png")),
                                 line("bad-url", "data:image/png;base64,@@@")]) + "\n")
    result = run_cli("batch", model, source, "-o", tmp_path / "out.jsonl", "--allow-path", picture.parent)
    assert result.returncode == 0, result.stderr
    lines = {item["custom_id"]: item for item in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert line_error(lines["path"]) is None and line_error(lines["data"]) is None
    usage = lines["data"]["response"]["body"]["usage"]
    # The 2×2 grid [IMG][IMG][IMG_BREAK][IMG][IMG][IMG_END] in place of the template's [IMG], as mistral-common counts.
    expected = mistral_tokens(mistral, messages(small))
    assert usage["prompt_tokens"] == len(expected) and expected.count(10) == 4
    assert "does not exist" in line_error(lines["missing"])["message"]
    assert "valid base64" in line_error(lines["bad-url"])["message"]


def test_batch_images_without_projector_are_error_lines(model, picture, tmp_path):
    lonely = tmp_path / "model.gguf"
    lonely.symlink_to(model)
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(picture)}}]}],
            "max_tokens": 2}
    plain = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps({"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
                                            "body": b}) for c, b in (("img", body), ("txt", plain))) + "\n")
    result = run_cli("batch", lonely, source, "-o", tmp_path / "out.jsonl", "--allow-path", picture.parent)
    assert result.returncode == 0, result.stderr
    lines = {item["custom_id"]: item for item in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert "need a vision projector" in line_error(lines["img"])["message"]
    assert line_error(lines["txt"]) is None


def test_image_command_in_the_chat_repl(model, picture, terminal, tmp_path):
    saved = tmp_path / "conversation.json"
    term = terminal(model, "--ctx", "2048", "-n", "4", "--seed", "3")
    term.wait(lambda ls: term.at_prompt(ls, 1), 90, "the first prompt")
    assert "error: image file" in term.submit(f"/image {tmp_path / 'missing.png'}")
    attached = term.submit(f"/image {picture}")
    assert "attached" in attached and "120×80" not in attached and "(140×84 px, 18 tokens)" in attached
    term.submit("What is this?")
    first = stats_numbers(term.submit("/stats"))
    assert first["prompt"] > 18 and (first["reused"], first["evaluated"]) == (0, first["prompt"])  # image included
    term.submit("And without a picture?")
    second = stats_numbers(term.submit("/stats"))
    assert first["prompt"] - 5 < second["reused"] and second["reused"] + second["evaluated"] == second["prompt"]
    assert "saved 4 messages" in term.submit(f"/save {saved}")
    messages = json.loads(saved.read_text())
    assert messages[0]["content"][0] == {"type": "image_url", "image_url": {"url": str(picture)}}
    assert messages[0]["content"][1] == {"type": "text", "text": "What is this?"}
    assert messages[2]["content"] == "And without a picture?"  # the image went with one message only
    term.keys("C-d")
    term.wait(lambda ls: "[exited 0]" in ls, 30, "the REPL to exit")


# --------------------------------------------------------------------------- normalization


def test_pillow_normalizes_orientation_modes_and_transparency():
    from smallfour.images import prepare_bytes

    rng, _ = fresh_rng()
    pixels = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    # EXIF orientation 6 (rotate 90° clockwise to display): the prepared image is upright, 56 wide.
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    upright = prepare_bytes("exif", buffer.getvalue())
    assert (upright.width, upright.height) == (56, 84)

    # Fully transparent pixels become white, as mistral-common composites them.
    rgba = np.concatenate([pixels, np.zeros((56, 84, 1), dtype=np.uint8)], axis=2)
    clear = prepare_bytes("rgba", png_bytes(rgba))
    assert set(clear.rgb) == {255}

    # Palette, grey+alpha, CMYK: all come out as RGB of the grid's size.
    for mode, fmt in (("P", "PNG"), ("LA", "PNG"), ("CMYK", "JPEG"), ("L", "PNG")):
        prepared = prepare_bytes(mode, png_bytes(pixels, mode, fmt))
        assert (prepared.width, prepared.height) == (84, 56)
        assert len(prepared.rgb) == 84 * 56 * 3
    cmyk = np.frombuffer(prepare_bytes("cmyk", png_bytes(pixels, "CMYK", "TIFF")).rgb, np.uint8).reshape(56, 84, 3)
    assert np.abs(cmyk.astype(int) - pixels).max() <= 2
