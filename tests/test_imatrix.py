"""Importance matrices: llama.cpp's file format, collection through llama.cpp, and use by its quantizer.

- Files we write are read back by ggml's own GGUF parser (libggml-base, the code
  `common_imatrix_load` runs), pairing `.in_sum2`/`.counts` as it does.
- Statistics collected by `smallfour imatrix` through llama.cpp's eval callback match an
  independent computation in `transformers`: sums of squares of every weight's inputs,
  per expert from the router's own top-k choice.
- llama.cpp's quantizer (`llama_model_quantize`, as `llama-quantize --imatrix` calls it) given
  `load_imatrix`'s importances writes byte for byte what our quantizer writes with
  `importance_rows` per expert slice, so the per-expert mapping is llama.cpp's.
"""

from __future__ import annotations

import ctypes
import os
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

from conftest import HF
from quant.imatrix import ImatrixError, importance_rows, load_imatrix, read_imatrix, save_imatrix
from smallfour.imatrix import GgmlTensor, collect_imatrix


def fresh_rng():
    seed = int.from_bytes(os.urandom(4), "little")
    return seed, np.random.default_rng(seed)


# --- ggml's own GGUF reader ---------------------------------------------------------------------


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _gguf_lib():
    from smallfour.imatrix import _ggml_base

    lib = _ggml_base()
    p, i64, s = ctypes.c_void_p, ctypes.c_int64, ctypes.c_char_p
    signatures = {
        "gguf_init_from_file": ([s, _InitParams], p), "gguf_free": ([p], None), "ggml_free": ([p], None),
        "gguf_find_key": ([p, s], i64), "gguf_get_kv_type": ([p, i64], ctypes.c_int),
        "gguf_get_arr_type": ([p, i64], ctypes.c_int), "gguf_get_arr_n": ([p, i64], ctypes.c_size_t),
        "gguf_get_arr_str": ([p, i64, ctypes.c_size_t], s), "gguf_get_val_u32": ([p, i64], ctypes.c_uint32),
        "gguf_get_val_str": ([p, i64], s), "gguf_get_n_kv": ([p], i64), "gguf_get_key": ([p, i64], s),
        "ggml_get_first_tensor": ([p], p), "ggml_get_next_tensor": ([p, p], p),
    }
    for name, (args, res) in signatures.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, res
    return lib


def ggml_gguf(path, metadata=None):
    """{tensor name: (ggml type id, ne, raw bytes)} as ggml's own GGUF loader reads them.

    `metadata(lib, gguf, keys)` may read key/values while the file is open."""
    lib = _gguf_lib()
    ctx = ctypes.c_void_p()
    gguf = lib.gguf_init_from_file(str(path).encode(), _InitParams(False, ctypes.pointer(ctx)))
    assert gguf, "ggml could not parse the file"
    try:
        keys = {lib.gguf_get_key(gguf, k).decode(): k for k in range(lib.gguf_get_n_kv(gguf))}
        meta = metadata(lib, gguf, keys) if metadata else None
        tensors = {}
        cur = lib.ggml_get_first_tensor(ctx)
        while cur:
            t = GgmlTensor.from_address(cur)
            nbytes = lib.ggml_nbytes(cur)
            tensors[t.name.decode()] = (t.type, tuple(t.ne[:]),
                                        np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(t.data)).copy())
            cur = lib.ggml_get_next_tensor(ctx, cur)
    finally:
        lib.gguf_free(gguf)
        lib.ggml_free(ctx)
    return meta, tensors


def ggml_f32(entry) -> np.ndarray:
    kind, ne, raw = entry
    assert kind == 0, "expected an F32 tensor"
    dims = [n for n in ne]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return raw.view(np.float32).reshape(tuple(reversed(dims)))


def ggml_read_imatrix(path):
    """(metadata, {name: (sums [n_mat, n], counts [n_mat])}) as llama.cpp's imatrix loader sees the file."""

    def metadata(lib, gguf, keys):
        meta = {"keys": sorted(keys), "general.type": lib.gguf_get_val_str(gguf, keys["general.type"]).decode()}
        datasets = keys["imatrix.datasets"]
        assert (lib.gguf_get_kv_type(gguf, datasets), lib.gguf_get_arr_type(gguf, datasets)) == (9, 8)  # str[]
        meta["datasets"] = [lib.gguf_get_arr_str(gguf, datasets, i).decode()
                            for i in range(lib.gguf_get_arr_n(gguf, datasets))]
        for key in ("imatrix.chunk_count", "imatrix.chunk_size"):
            assert lib.gguf_get_kv_type(gguf, keys[key]) == 4  # uint32
            meta[key] = lib.gguf_get_val_u32(gguf, keys[key])
        return meta

    meta, all_tensors = ggml_gguf(path, metadata)
    # ggml adds one blob tensor of the whole data section; the loader, like this, skips other names.
    tensors = {n: t for n, t in all_tensors.items() if n.endswith((".in_sum2", ".counts"))}
    entries = {}
    for name, (kind, ne, raw) in tensors.items():
        assert kind == 0, "imatrix tensors must be F32"
        if name.endswith(".in_sum2"):
            base = name[: -len(".in_sum2")]
            n, n_mat = ne[0], ne[1]
            counts_kind, counts_ne, counts_raw = tensors[base + ".counts"]
            assert counts_ne[:2] == (1, n_mat)
            entries[base] = (raw.view(np.float32).reshape(n_mat, n),
                             np.rint(counts_raw.view(np.float32)).astype(np.int64))
    assert len(tensors) == 2 * len(entries)
    return meta, entries


def random_statistics(rng, n_experts=8, n=64):
    sums = {"blk.0.ffn_down_exps.weight": rng.random((n_experts, n), dtype=np.float32) * 100,
            "blk.0.attn_q_a.weight": rng.random(2 * n, dtype=np.float32) * 100,
            "blk.1.attn_k_b.weight": rng.random((1, 4 * n), dtype=np.float32)}
    expert_counts = rng.integers(1, 500, n_experts)
    expert_counts[rng.integers(n_experts)] = 0  # an expert no token reached
    counts = {"blk.0.ffn_down_exps.weight": expert_counts, "blk.0.attn_q_a.weight": int(rng.integers(16, 900)),
              "blk.1.attn_k_b.weight": np.array([int(rng.integers(16, 900))])}
    return sums, counts


def test_file_is_what_llama_cpp_reads(tmp_path):
    seed, rng = fresh_rng()
    sums, counts = random_statistics(rng)
    path = save_imatrix(tmp_path / "imatrix.gguf", sums, counts, datasets=["calib.txt"], chunk_size=64)
    meta, entries = ggml_read_imatrix(path)
    assert meta["general.type"] == "imatrix", seed
    assert meta["keys"] == ["general.type", "imatrix.chunk_count", "imatrix.chunk_size", "imatrix.datasets"]
    assert meta["datasets"] == ["calib.txt"] and meta["imatrix.chunk_size"] == 64
    largest = max(int(np.max(c)) for c in counts.values())
    assert meta["imatrix.chunk_count"] == largest // 64  # llama-imatrix's own count
    assert sorted(entries) == sorted(sums)
    for name, (got_sums, got_counts) in entries.items():
        want_counts = np.atleast_1d(counts[name])
        np.testing.assert_array_equal(got_counts, want_counts, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(got_sums.reshape(-1), np.asarray(sums[name]).reshape(-1), err_msg=f"seed {seed}")
        assert got_sums.shape[0] == want_counts.size
    # The loader's view: in_sum2 / count per matrix, 1 where no token was seen (llama-quantize's rule).
    importance = load_imatrix(path)
    for name, (got_sums, got_counts) in entries.items():
        expected = np.where(got_counts[:, None] > 0, got_sums / np.maximum(got_counts, 1)[:, None], 1.0)
        np.testing.assert_allclose(importance[name].reshape(expected.shape), expected, rtol=1e-6)
    assert importance["blk.0.ffn_down_exps.weight"].shape == (8, 64)
    assert importance["blk.0.attn_q_a.weight"].shape == (128,)
    info = read_imatrix(path)
    assert (info.datasets, info.chunk_size) == (["calib.txt"], 64)


def test_importance_rows_follow_the_tensor_shape():
    _, rng = fresh_rng()
    per_head = rng.random(4 * 32).astype(np.float32)
    rows = importance_rows(per_head, "blk.0.attn_k_b.weight", (4, 16, 32))
    np.testing.assert_array_equal(rows[2], per_head[64:96])
    experts = rng.random((8, 256)).astype(np.float32)
    np.testing.assert_array_equal(importance_rows(experts, "x", (8, 512, 256)), experts)
    assert importance_rows(experts[0], "x", (512, 256)).shape == (1, 256)
    with pytest.raises(ImatrixError, match="another model"):
        importance_rows(experts, "blk.0.ffn_down_exps.weight", (16, 512, 256))


def test_importance_is_the_mean_and_one_for_an_expert_never_routed():
    """llama-quantize's rule (tools/quantize: "this tensor never got any input"): sums / count, and
    1.0 for every column of an expert whose count is 0, so it is quantized without a preference."""
    from quant.imatrix import Imatrix

    _, rng = fresh_rng()
    sums = rng.random((4, 32)).astype(np.float32)
    counts = np.array([3, 0, 7, 1], dtype=np.int64)
    mean = Imatrix({"blk.0.ffn_down_exps.weight": sums}, {"blk.0.ffn_down_exps.weight": counts}).importance()
    got = mean["blk.0.ffn_down_exps.weight"]
    np.testing.assert_allclose(got[[0, 2, 3]], sums[[0, 2, 3]] / counts[[0, 2, 3], None], rtol=1e-6)
    np.testing.assert_array_equal(got[1], np.ones(32, np.float32))


def test_wrong_files_are_refused_clearly(tmp_path, converted):
    with pytest.raises(ImatrixError, match="does not exist"):
        load_imatrix(tmp_path / "missing.gguf")
    legacy = tmp_path / "imatrix.dat"  # llama.cpp's legacy format: n_entries, then name/ncall/nval/values
    name = b"blk.0.attn_q_a.weight"
    legacy.write_bytes(struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 1, 4) + b"\0" * 16)
    with pytest.raises(ImatrixError, match="legacy .dat format"):
        load_imatrix(legacy)
    with pytest.raises(ImatrixError, match="not an importance matrix"):
        load_imatrix(converted(HF, "q8_0"))
    bare = tmp_path / "bare.gguf"  # in_sum2/counts without the metadata llama-quantize insists on
    writer = GGUFWriter(bare, arch="")
    writer.add_tensor("a.weight.in_sum2", np.ones((1, 8), np.float32))
    writer.add_tensor("a.weight.counts", np.ones((1, 1), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ImatrixError, match="missing imatrix metadata"):
        load_imatrix(bare)
    with pytest.raises(ImatrixError, match="same tensors"):
        save_imatrix(tmp_path / "x.gguf", {"a": np.ones(4)}, {"b": 1}, ["d"])
    with pytest.raises(ImatrixError, match="split into"):
        save_imatrix(tmp_path / "y.gguf", {"a": np.ones(5)}, {"a": [1, 2]}, ["d"])


# --- collection through llama.cpp vs transformers -----------------------------------------------


def reference_statistics(model, chunks, spec):
    """Sums of squared inputs and counts per GGUF weight, computed with forward hooks in transformers."""
    import torch

    sums, counts = {}, {}

    def add(name, rows, n_mat=1, mat=None):
        rows = rows.detach().double().reshape(-1, rows.shape[-1])
        if n_mat == 1:
            sums.setdefault(name, torch.zeros(rows.shape[-1], dtype=torch.float64))
            sums[name] += (rows ** 2).sum(0)
            counts[name] = counts.get(name, 0) + rows.shape[0]
        else:
            sums.setdefault(name, torch.zeros(n_mat, rows.shape[-1], dtype=torch.float64))
            counts.setdefault(name, torch.zeros(n_mat, dtype=torch.int64))
            sums[name][mat] += (rows ** 2).sum(0)
            counts[name][mat] += rows.shape[0]

    text = model.model.language_model
    hooks = []
    for i, layer in enumerate(text.layers):
        attn, mlp = layer.self_attn, layer.mlp
        linear = {"attn_q_a": attn.q_a_proj, "attn_q_b": attn.q_b_proj, "attn_kv_a_mqa": attn.kv_a_proj_with_mqa,
                  "attn_output": attn.o_proj, "ffn_gate_shexp": mlp.shared_experts.gate_proj,
                  "ffn_up_shexp": mlp.shared_experts.up_proj, "ffn_down_shexp": mlp.shared_experts.down_proj}
        for gguf_name, module in linear.items():
            hooks.append(module.register_forward_hook(
                lambda _m, args, _o, n=f"blk.{i}.{gguf_name}.weight": add(n, args[0])))
        hooks.append(mlp.gate.register_forward_hook(
            lambda _m, args, _o, n=f"blk.{i}.ffn_gate_inp.weight": add(n, args[0])))

        def q_nope(_m, _args, out, i=i):  # MLA's absorbed k_b multiplies the per-head q_nope
            q = out.reshape(*out.shape[:-1], spec.n_heads, spec.qk_nope_head_dim + spec.qk_rope_head_dim)
            nope = q[..., : spec.qk_nope_head_dim].reshape(-1, spec.n_heads, spec.qk_nope_head_dim)
            add(f"blk.{i}.attn_k_b.weight", nope.reshape(nope.shape[0], -1))  # head by head

        hooks.append(attn.q_b_proj.register_forward_hook(q_nope))

        def experts(module, args, _o, i=i):
            hidden, indices = args[0], args[1]
            for e in range(spec.n_experts):
                rows = (indices == e).any(-1)
                if not rows.any():
                    continue
                x = hidden[rows]
                add(f"blk.{i}.ffn_gate_up_exps.weight", x, spec.n_experts, e)
                gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
                add(f"blk.{i}.ffn_down_exps.weight", module.act_fn(gate) * up, spec.n_experts, e)
        hooks.append(mlp.experts.register_forward_hook(experts))
    try:
        with torch.no_grad():
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk]))
    finally:
        for h in hooks:
            h.remove()
    return sums, counts


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    _, rng = fresh_rng()
    words = ["model", "weights", "river", "quantum", "import", "def", "return", "mountain", "(", ")", "42", "the",
             "expert", "router", "Paris", "é", "数据", "\n", "    ", "token"]
    path = tmp_path_factory.mktemp("calibration") / "text.txt"
    path.write_text(" ".join(rng.choice(words, 600)))
    return path


def test_collected_statistics_match_transformers(converted, checkpoint, calibration, tmp_path, tmp_path_factory):
    from reference import reference_model
    from smallfour.model import Model

    spec = HF
    gguf = converted(spec, "f32")
    n_ctx = 64
    report = collect_imatrix(gguf, calibration, tmp_path / "imatrix.gguf", n_ctx=n_ctx, chunks=3, kv_type="f32")
    assert (report.chunks, report.chunk_size) == (3, n_ctx)
    info = read_imatrix(report.output)
    assert (info.chunk_count, info.chunk_size, info.datasets) == (3, n_ctx, [str(calibration)])
    # The chunks as llama.cpp saw them: the text's tokens, <s> first in every chunk.
    with Model.load(gguf, n_ctx=n_ctx, vocab_only=True) as llm:
        tokens = llm.tokenize(calibration.read_text(), add_bos=True)
        chunks = [[llm.bos, *tokens[i * n_ctx + 1:(i + 1) * n_ctx]] for i in range(3)]
    ref_sums, ref_counts = reference_statistics(reference_model(checkpoint(spec), tmp_path_factory.getbasetemp()),
                                                chunks, spec)
    expected_names = set(ref_sums) | {f"blk.{i}.attn_v_b.weight" for i in range(spec.n_layers)}
    assert set(info.sums) == expected_names
    for name, ref in ref_sums.items():
        got = info.sums[name].astype(np.float64).reshape(ref.shape)
        ref = ref.numpy()
        error = np.abs(got - ref).max() / np.abs(ref).max()
        if name.endswith("_exps.weight"):
            np.testing.assert_array_equal(info.counts[name], ref_counts[name].numpy(), err_msg=name)
            # every expert's own statistics, not just the total
            per_expert = np.abs(got - ref).max(-1) / np.maximum(np.abs(ref).max(-1), 1e-30)
            assert per_expert.max() < 2e-3, f"{name}: per-expert relative error {per_expert.max():.2e}"
        else:
            assert info.counts[name].tolist() == [3 * n_ctx], name
        assert error < 2e-3, f"{name}: relative error {error:.2e}"
    # v_b's input (attention-weighted latents per head) has no transformers counterpart; its size does.
    per_head = spec.kv_lora_rank * spec.n_heads
    assert info.sums["blk.0.attn_v_b.weight"].shape == (1, per_head)


def test_llama_cpp_quantizer_uses_the_imatrix_per_expert(converted, tmp_path):
    """llama-quantize's path with our importances == our quantizer with importance_rows, slice by slice."""
    from quant.ggml import quantize
    from llamacpp import llama_quantize

    seed, rng = fresh_rng()
    gguf = converted(HF, "f32")
    _, source = ggml_gguf(gguf)
    weights = {name: ggml_f32(t) for name, t in source.items() if t[0] == 0}
    sums, counts = {}, {}
    for name, w in weights.items():
        if w.ndim < 2 or not name.startswith("blk.") or "ffn_gate_inp" in name or "norm" in name:
            continue
        n_mat = w.shape[0] if "_exps" in name else 1
        per_row = w.shape[-1] * (w.shape[0] if (w.ndim == 3 and n_mat == 1) else 1)
        # Strongly non-uniform importances, a different profile per expert, one expert never reached.
        sums[name] = (rng.lognormal(0, 2, (n_mat, per_row)) * 50).astype(np.float32)
        counts[name] = rng.integers(1, 100, n_mat)
        if n_mat > 1:
            counts[name][rng.integers(n_mat)] = 0
    path = save_imatrix(tmp_path / "imatrix.gguf", sums, counts, ["random"], chunk_size=32)
    importance = load_imatrix(path)
    out = tmp_path / "q4_0.gguf"
    llama_quantize(gguf, out, T.Q4_0, importance=importance)
    _, quantized = ggml_gguf(out)
    checked = 0
    for name in sums:
        kind, _, raw = quantized[name]
        if kind != int(T.Q4_0):
            continue
        w = weights[name]
        mats = w.reshape(-1, w.shape[-2], w.shape[-1])
        rows = importance_rows(importance[name], name, w.shape)
        ours = np.concatenate([quantize(m, T.Q4_0, rows[i]) for i, m in enumerate(mats)])
        theirs = raw.reshape(ours.shape)
        assert (ours == theirs).all(), f"seed {seed}: {name} differs from llama.cpp's quantization"
        if "_exps" in name:
            plain = np.concatenate([quantize(m, T.Q4_0) for m in mats])
            assert (plain != theirs).any(), f"{name}: the importance changed nothing"
            checked += 1
    assert checked == 2 * HF.n_layers


def test_cli_writes_an_imatrix_and_refuses_bad_input(converted, calibration, tmp_path):
    from helpers import assert_one_line_error, run_cli

    gguf = converted(HF, "f32")
    out = tmp_path / "cli.imatrix.gguf"
    result = run_cli("imatrix", gguf, "--text", calibration, "-o", out, "--ctx", "32", "--chunks", "2")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and read_imatrix(out).chunk_count == 2
    assert_one_line_error(run_cli("imatrix", gguf, "--text", tmp_path / "nope.txt", "-o", out),
                          "does not exist")
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    assert_one_line_error(run_cli("imatrix", gguf, "--text", short, "-o", out, "--ctx", "64"), "fewer than one chunk")
