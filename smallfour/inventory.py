"""What the planner knows of a model before loading it: every tensor (name, role, layer, type, bytes).

From a GGUF's header (`model_from_gguf`), or, before any download, from a checkpoint
config plus a recipe (`model_from_config`): the tensors then come from
`convert.mistral4.tensor_inventory`, the same list the converter writes, typed by the
same recipe code, so a plan sizes exactly the file `smallfour convert` would make.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from gguf import GGMLQuantizationType, Keys, LlamaFileType

from convert.config import TextConfig, from_hf_config, from_native_params
from convert.mistral4 import tensor_inventory
from quant.gguf_io import read_header
from quant.names import ROLES, layer_of, role_of
from quant.pipeline import METADATA_RECIPE, resolve_recipe_spec
from quant.recipes import (BUILTIN_RECIPES, Recipe, TensorSlot, choose_type, load_recipe, single_type_recipe,
                           stored_nbytes)
from smallfour.errors import SmallfourError

# Recipes the planner can size, largest first. The converter produces BUILTIN_RECIPES
# today; the others are sized as one type for every matrix (what llama.cpp's plain
# recipes approximate) so a plan can say what a future recipe would need.
RECIPE_LADDER = ("f32", "bf16", "f16", "q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k")

REAL_MODEL_NAME = "mistral-small-4"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    role: str
    layer: int | None
    shape: tuple[int, ...]  # numpy order: rows first, the row length last
    qtype: GGMLQuantizationType
    nbytes: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str  # "gguf", "config" or "built-in"
    recipe: str
    n_layers: int
    hidden_size: int
    n_heads: int
    vocab_size: int
    kv_lora_rank: int
    rope_dim: int
    n_experts: int
    n_experts_used: int
    expert_ff: int
    tensors: tuple[TensorInfo, ...]

    @property
    def weights_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def kv_width(self) -> int:
        """Values cached per token per layer: MLA's compressed latent plus the shared rope key."""
        return self.kv_lora_rank + self.rope_dim

    def bytes_by_role(self) -> dict[str, int]:
        totals = dict.fromkeys(ROLES, 0)
        for t in self.tensors:
            totals[t.role] = totals.get(t.role, 0) + t.nbytes
        return {role: n for role, n in totals.items() if n}


def real_hf_config() -> dict:
    """Mistral Small 4's `config.json`, text part, from the brief's hyper-parameters.

    Placement needs only the shapes; the rope fields are the release's documented
    YaRN settings (factor 128 over 8192) so the config also converts cleanly.
    """
    return {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "mistral4",
            "vocab_size": 131072,
            "hidden_size": 4096,
            "intermediate_size": 12288,  # dense FFN size; unused, no leading dense layers
            "moe_intermediate_size": 2048,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "n_shared_experts": 1,
            "n_routed_experts": 128,
            "num_experts_per_tok": 4,
            "first_k_dense_replace": 0,
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.0,
            "q_lora_rank": 1024,
            "kv_lora_rank": 256,
            "qk_rope_head_dim": 64,
            "qk_nope_head_dim": 64,
            "v_head_dim": 128,
            "max_position_embeddings": 1048576,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0,
                                "original_max_position_embeddings": 8192, "beta_fast": 32.0, "beta_slow": 1.0,
                                "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
        },
    }


def real_config() -> TextConfig:
    return from_hf_config(real_hf_config())


def recipe_type(recipe: str) -> GGMLQuantizationType:
    name = recipe.lower()
    if name in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[name]
    if name in RECIPE_LADDER:
        return GGMLQuantizationType[name.upper()]
    raise SmallfourError(f"unknown recipe {recipe!r}; the planner sizes {', '.join(RECIPE_LADDER)}")


def is_plan_only(recipe: str) -> bool:
    """True for recipes the planner can size but `smallfour convert` does not produce yet."""
    try:
        load_recipe(recipe)
    except SmallfourError:
        return True
    return False


def recipe_for(recipe: str, tensors: list[TensorInfo] | tuple[TensorInfo, ...], n_layers: int) -> Recipe:
    """A recipe the converter would apply: a ladder type, a preset, a TOML file or fit:SIZE
    (solved for `tensors`, the same size model `smallfour convert` uses)."""
    if recipe.lower() in RECIPE_LADDER:
        return single_type_recipe(recipe_type(recipe))
    return resolve_recipe_spec(recipe, [TensorSlot(t.name, t.role, t.layer, t.shape) for t in tensors], n_layers)


def _typed(name: str, role: str, layer: int | None, shape: tuple[int, ...],
           recipe: GGMLQuantizationType | Recipe, n_layers: int) -> TensorInfo:
    if isinstance(recipe, Recipe):
        qtype = recipe.choose(name, role, layer, shape, n_layers).qtype
    else:
        qtype = choose_type(recipe, role, shape).qtype
    return TensorInfo(name, role, layer, shape, qtype, stored_nbytes(shape, qtype))


def _config_tensors(cfg: TextConfig, recipe: GGMLQuantizationType | Recipe) -> list[TensorInfo]:
    """Every GGUF tensor the converter writes for `cfg`, in file order, typed by `recipe`."""
    return [_typed(t.name, t.role, t.layer, t.shape, recipe, cfg.n_layers) for t in tensor_inventory(cfg)]


def model_from_config(cfg: TextConfig, recipe: str = "bf16", name: str = "config") -> ModelInfo:
    tensors = _config_tensors(cfg, recipe_for(recipe, _config_tensors(cfg, GGMLQuantizationType.F32), cfg.n_layers))
    return ModelInfo(name=name, source="config", recipe=recipe.lower(), n_layers=cfg.n_layers,
                     hidden_size=cfg.hidden_size, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                     kv_lora_rank=cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim, n_experts=cfg.n_experts,
                     n_experts_used=cfg.n_experts_used, expert_ff=cfg.expert_ff, tensors=tuple(tensors))


def real_model(recipe: str = "bf16") -> ModelInfo:
    return replace(model_from_config(real_config(), recipe, REAL_MODEL_NAME), source="built-in")


def load_config(path: Path) -> TextConfig:
    """A TextConfig from `config.json`, `params.json`, or a checkpoint directory holding one."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("config.json", "params.json") if (path / n).is_file()]
        if not found:
            raise SmallfourError(f"{path} has no config.json or params.json")
        path = found[0]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SmallfourError(f"cannot read {path} as JSON: {exc}") from None
    native = "moe" in data and "kv_lora_rank" in data and "text_config" not in data
    return from_native_params(data) if native else from_hf_config(data)


def model_from_gguf(path: Path) -> ModelInfo:
    """The tensor inventory and MLA hyper-parameters of a GGUF, read from its header only."""
    path = Path(path)
    header = read_header(path, what="model file")
    fields, arch = header.fields, header.architecture
    if header.arch_field(Keys.Attention.KV_LORA_RANK) is None:
        raise SmallfourError(f"{path.name} is a {arch} model; the planner knows MLA models (mistral4)")
    tensors = tuple(TensorInfo(t.name, role_of(t.name), layer_of(t.name), t.shape, t.qtype, t.nbytes)
                    for t in header.tensors)
    file_type = fields.get(Keys.General.FILE_TYPE)
    recipe = LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower() \
        if file_type is not None else "?"
    recipe = fields.get(METADATA_RECIPE) or recipe  # the recipe smallfour wrote it with
    return ModelInfo(
        name=path.name, source="gguf", recipe=recipe, n_layers=header.arch_field(Keys.LLM.BLOCK_COUNT),
        hidden_size=header.arch_field(Keys.LLM.EMBEDDING_LENGTH),
        n_heads=header.arch_field(Keys.Attention.HEAD_COUNT),
        vocab_size=header.arch_field(Keys.LLM.VOCAB_SIZE) or fields.get(Keys.Tokenizer.LIST, 0),
        kv_lora_rank=header.arch_field(Keys.Attention.KV_LORA_RANK),
        rope_dim=header.arch_field(Keys.Rope.DIMENSION_COUNT),
        n_experts=header.arch_field(Keys.LLM.EXPERT_COUNT, 0),
        n_experts_used=header.arch_field(Keys.LLM.EXPERT_USED_COUNT, 0),
        expert_ff=header.arch_field(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, 0), tensors=tensors)


def retyped(model: ModelInfo, recipe: str) -> ModelInfo:
    """The same model converted with another recipe (norms and router stay F32, as in convert)."""
    chosen = recipe_for(recipe, model.tensors, model.n_layers)
    tensors = tuple(_typed(t.name, t.role, t.layer, t.shape, chosen, model.n_layers) for t in model.tensors)
    return replace(model, recipe=recipe.lower(), tensors=tensors)


def mmproj_bytes(path: Path) -> int:
    """Bytes of a projector GGUF's tensors (any architecture)."""
    return sum(t.nbytes for t in read_header(path, what="projector file").tensors)
