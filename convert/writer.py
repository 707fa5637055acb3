"""Checkpoint → GGUF, streamed: header first, then each tensor piece by piece.

The output is written under a temporary name beside the target and renamed
only when complete, so an interrupted or failed conversion never leaves a file
that looks like a valid model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from convert.checkpoint import Checkpoint, open_checkpoint
from convert.config import TextConfig
from convert.errors import ConversionError
from convert.output import NoProgress, Progress, atomic_outputs, check_outputs
from convert.mistral4 import PlannedTensor, plan_tensors
from convert.mmproj import (DEFAULT_MMPROJ_TYPE, MmprojReport, has_vision, is_vision_tensor, mmproj_path,
                            plan_projector, write_projector)
from convert.vocab import Vocabulary, add_vocabulary, load_vocabulary, tekken_path
from quant.imatrix import load_importance, tensor_importance
from quant.pipeline import (Encoder, add_recipe_metadata, assign_types, check_requirements, fallback_lines,
                            file_type_of, gguf_overhead, kv_nbytes, prefetched, resolve_recipe_spec,
                            validate_recipe_spec)
from quant.recipes import TensorSlot, load_recipe, stored_nbytes

ARCH = "mistral4"


@dataclass
class ConversionReport:
    output: Path
    layout: str
    tensors: int
    source_bytes: int
    output_bytes: int
    fallbacks: list[str] = field(default_factory=list)
    mmproj: MmprojReport | None = None  # the vision projector written beside it, if any
    recipe: str = ""  # the quantization recipe applied (its name)


def convert_checkpoint(source: Path, output: Path, recipe: str = "bf16", *, force: bool = False,
                       progress: Progress | None = None, mmproj: bool = True, mmproj_output: Path | None = None,
                       mmproj_type: str = DEFAULT_MMPROJ_TYPE, imatrix: Path | None = None,
                       threads: int | None = None) -> ConversionReport:
    """Convert a Mistral Small 4 checkpoint directory (either layout) to a GGUF file.

    With `mmproj`, a checkpoint that has a vision tower also gets its projector GGUF
    (`mmproj_output`, by default `OUT-mmproj.gguf` beside the model). The two files are one
    transaction: both land, or neither does. Every check that can fail runs before the
    long text conversion.
    """
    output, source = Path(output), Path(source)
    progress = progress or NoProgress()
    inputs = _inputs(source) + [Path(p) for p in (imatrix, recipe) if p is not None and Path(p).is_file()]
    check_outputs([output], inputs, force=force)
    validate_recipe_spec(recipe)  # an unknown recipe fails before any work
    importance = load_importance(imatrix)
    ckpt = open_checkpoint(source)
    try:
        tekken_path(ckpt.path)  # no tokenizer at all is said as such, before the projector looks up [IMG_BREAK]
        outputs, projector = [output], None
        if mmproj and (mmproj_output is not None or has_vision(ckpt)):
            outputs.append(Path(mmproj_output) if mmproj_output is not None else mmproj_path(output))
            check_outputs(outputs, inputs, force=force)
            projector = plan_projector(ckpt, mmproj_type)
        planned = plan_tensors(ckpt)
        consumed = {source for tensor in planned for source in tensor.sources}
        if projector is not None:
            consumed |= {tensor.source for tensor in projector.tensors}
        # Without a projector (--no-mmproj) the vision tower is left out by request, not by a contradiction.
        ckpt.check_consumed(consumed, is_vision_tensor if not mmproj else lambda name: False)
        if recipe.lower().startswith("fit:"):
            # A budget the tensors alone exceed fails now, not after the vocabulary is read (seconds).
            resolve_recipe_spec(recipe, _slots(planned), ckpt.config.n_layers, importance, None)
        vocabulary = load_vocabulary(ckpt.path)
        if vocabulary.template_note is not None:
            progress.note(vocabulary.template_note)
        total_source = sum(t.source_bytes for t in planned)
        with atomic_outputs(*outputs, note=progress.note) as temporaries:
            report = _write(ckpt, planned, temporaries[0], recipe, progress, vocabulary, importance, threads,
                            imatrix)
            if projector is not None:
                written = write_projector(projector, temporaries[1])
                report.mmproj = MmprojReport(outputs[1], len(projector.tensors), written)
    finally:
        ckpt.close()
    report.output, report.source_bytes = output, total_source
    return report


def _inputs(source: Path) -> list[Path]:
    """The files a conversion reads (a directory's files, or a file itself), which no output may overwrite."""
    if source.is_dir():
        return [p for p in source.iterdir() if p.is_file()]
    return [source]


def _write(ckpt: Checkpoint, planned: list[PlannedTensor], path: Path, recipe_spec: str, progress: Progress,
           vocabulary: Vocabulary, importance: dict | None = None, threads: int | None = None,
           imatrix_path: Path | None = None) -> ConversionReport:
    slots = _slots(planned)
    n_layers = ckpt.config.n_layers
    overhead = 0
    if recipe_spec.lower().startswith("fit:"):
        # The budget counts the whole file: measure the header a first writer would produce.
        scratch = gguf.GGUFWriter(path, ARCH)
        add_metadata(scratch, ckpt.config, model_name(ckpt.path), gguf.LlamaFileType.GUESSED)
        add_vocabulary(scratch, vocabulary)
        add_recipe_metadata(scratch, load_recipe("q8_0"), imatrix_path)
        overhead = gguf_overhead(kv_nbytes(scratch) + 256, slots)  # + room for the recipe's name and description
    recipe = resolve_recipe_spec(recipe_spec, slots, n_layers, importance, overhead)
    choices = assign_types(recipe, slots, n_layers)
    check_requirements(choices, slots, importance)
    writer = gguf.GGUFWriter(path, ARCH)
    add_metadata(writer, ckpt.config, model_name(ckpt.path), file_type_of(choices, slots))
    add_vocabulary(writer, vocabulary)
    add_recipe_metadata(writer, recipe, imatrix_path)
    for tensor in planned:
        qtype = choices[tensor.name].qtype
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), stored_nbytes(tensor.shape, qtype),
                               raw_dtype=qtype)
    progress.start(sum(t.source_bytes for t in planned), len(planned))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    out = writer.fout[0]
    output_bytes = 0
    # The next piece is read and decoded on a background thread while this one is quantized and written.
    encoder, current, finished = None, -1, 0
    for index, piece in prefetched((i, piece) for i, t in enumerate(planned) for piece in t.pieces()):
        tensor = planned[index]
        if index != current:
            if encoder is not None:
                encoder.check_complete()
                output_bytes, finished = output_bytes + encoder.nbytes, finished + 1
            current = index
            out.write(b"\0" * (-out.tell() % writer.data_alignment))
            encoder = Encoder(slots[index], choices[tensor.name].qtype, tensor_importance(importance, slots[index]),
                              threads)
        data = encoder.encode(piece)
        # file.write (unlike ndarray.tofile) reports a full disk as errno ENOSPC.
        out.write(data.data)
        progress.advance(tensor.source_bytes * piece.shape[0] // tensor.shape[0], tensor.name,
                         encoder.offset == tensor.shape[0])
    if encoder is not None:
        encoder.check_complete()
        output_bytes, finished = output_bytes + encoder.nbytes, finished + 1
    if finished != len(planned):
        raise ConversionError(f"internal error: {len(planned) - finished} tensors produced no data")
    out.write(b"\0" * (-out.tell() % writer.data_alignment))
    out.flush()
    os.fsync(out.fileno())
    writer.close()
    return ConversionReport(path, ckpt.layout, len(planned), 0, output_bytes, fallback_lines(choices),
                            recipe=recipe.name)


def _slots(planned: list[PlannedTensor]) -> list[TensorSlot]:
    return [TensorSlot(t.name, t.role, t.layer, t.shape) for t in planned]


def model_name(checkpoint_dir: Path) -> str:
    """The checkpoint's name; a hub-cache snapshot is named by its commit, so take the repo's."""
    if checkpoint_dir.parent.name == "snapshots" and checkpoint_dir.parent.parent.name.startswith("models--"):
        return checkpoint_dir.parent.parent.name.split("--", 2)[-1]
    return checkpoint_dir.name


def add_metadata(writer: gguf.GGUFWriter, cfg: TextConfig, name: str, file_type: gguf.LlamaFileType) -> None:
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.dense_ff)
    writer.add_head_count(cfg.n_heads)
    # MLA runs as multi-query attention over the shared latent.
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_leading_dense_block_count(cfg.first_dense_layers)
    writer.add_q_lora_rank(cfg.q_lora_rank)
    writer.add_kv_lora_rank(cfg.kv_lora_rank)
    writer.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    writer.add_value_length(cfg.kv_lora_rank)
    writer.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    writer.add_value_length_mla(cfg.v_head_dim)
    writer.add_expert_feed_forward_length(cfg.expert_ff)
    writer.add_expert_count(cfg.n_experts)
    writer.add_expert_used_count(cfg.n_experts_used)
    writer.add_expert_shared_count(cfg.n_shared_experts)
    writer.add_expert_weights_scale(cfg.routed_scaling_factor)
    writer.add_expert_weights_norm(cfg.norm_topk_prob)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_rope_dimension_count(cfg.qk_rope_head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.yarn_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(cfg.yarn_factor)
        writer.add_rope_scaling_orig_ctx_len(cfg.yarn_original_context)
        if cfg.yarn_beta_fast is not None:
            writer.add_rope_scaling_yarn_beta_fast(cfg.yarn_beta_fast)
        if cfg.yarn_beta_slow is not None:
            writer.add_rope_scaling_yarn_beta_slow(cfg.yarn_beta_slow)
        if cfg.yarn_mscale_all_dim is not None:
            # llama.cpp's deepseek2 loader divides this key by 0.1 (a legacy convention).
            writer.add_rope_scaling_yarn_log_mul(0.1 * cfg.yarn_mscale_all_dim)
    if cfg.attn_temperature_beta is not None and cfg.attn_temperature_length:
        writer.add_attn_temperature_scale(cfg.attn_temperature_beta)
        writer.add_attn_temperature_length(cfg.attn_temperature_length)
