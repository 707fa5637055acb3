"""Mutation check: plant realistic bugs one at a time and see whether the targeted tests notice.

    .venv/bin/python tests/mutants.py                 # every mutant
    .venv/bin/python tests/mutants.py --only rules-reversed kv-padding
    .venv/bin/python tests/mutants.py --list

The repository's sources (smallfour/, convert/, quant/, tests/, pyproject.toml) are copied to a
scratch directory once; each mutant edits one line there, runs a few targeted tests with the
scratch copy first on PYTHONPATH (checked), and puts the line back. Fixture checkpoints are hard
links to the repository's cache (no mutant touches what their hash covers). Each group of targets is
run once unmutated first: a mutant whose targets fail without it is reported, not scored.

`issue` marks the mutants the tests of issue 18 were written for; the others are bugs those tests
were not written against, the honest measure. The score goes in docs/development.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
COPIED = ("smallfour", "convert", "quant", "tests", "pyproject.toml")
TIMEOUT_S = 900


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str  # must occur exactly once in the file
    new: str
    targets: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    issue: bool = False  # one of the bugs issue 18 wrote tests for
    why: str = ""


CONVERSATION = ("tests/test_conversation.py",)
RECIPES = ("tests/test_quant_recipes.py",)
TOKEN_COUNT = ("tests/test_vision.py", "-k", "token_count_matches or several_images")

MUTANTS = [
    # --- the bugs issue 18 listed (tests written for them) -------------------------------------
    Mutant("cpu-experts-loose", "smallfour/placement.py",
           r'return [(rf"^blk\.({layers})\.{EXPERT_TENSORS}\.", "CPU")]',
           r'return [(rf"^blk\.({layers}).*{EXPERT_TENSORS}\.", "CPU")]',
           ("tests/test_placement.py", "-k", "pins_exactly or first_n_layers"), True,
           "blk.1 also matches blk.10-19"),
    Mutant("img-break-repair-gone", "smallfour/vision.py",
           "    embd[image.tokens_x::image.tokens_x + 1] = projector.img_break\n", "",
           ("tests/test_vision.py", "-k", "poisoned or embeddings_match"), True),
    Mutant("img-break-stride", "smallfour/vision.py",
           "embd[image.tokens_x::image.tokens_x + 1] = projector.img_break",
           "embd[image.tokens_x::image.tokens_x] = projector.img_break",
           ("tests/test_vision.py", "-k", "poisoned or embeddings_match"), True),
    Mutant("rules-reversed", "quant/recipes.py", "        for rule in self.rules:\n",
           "        for rule in reversed(self.rules):\n", RECIPES, True),
    Mutant("tools-ascii", "smallfour/prompts.py", "def _tojson(value: Any, ensure_ascii: bool = False,",
           "def _tojson(value: Any, ensure_ascii: bool = True,", CONVERSATION, True),
    Mutant("tool-args-ascii", "smallfour/engine.py",
           '"arguments": json.dumps(parsed, ensure_ascii=False)}',
           '"arguments": json.dumps(parsed)}', CONVERSATION, True),
    Mutant("resize-nearest", "smallfour/images.py", "rgb = rgb.resize(size, Image.Resampling.BICUBIC)",
           "rgb = rgb.resize(size, Image.Resampling.NEAREST)", ("tests/test_vision.py", "-k", "pixels_match"), True),
    Mutant("resize-truncates", "smallfour/images.py",
           "width, height = max(round(width / ratio), 1), max(round(height / ratio), 1)",
           "width, height = max(int(width / ratio), 1), max(int(height / ratio), 1)", TOKEN_COUNT, True),
    Mutant("resize-half-up", "smallfour/images.py",
           "width, height = max(round(width / ratio), 1), max(round(height / ratio), 1)",
           "width, height = max(int(width / ratio + 0.5), 1), max(int(height / ratio + 0.5), 1)", TOKEN_COUNT, True),
    Mutant("kv-no-padding", "smallfour/planner.py",
           "return math.ceil(self.n_ctx / KV_CELL_PADDING) * KV_CELL_PADDING", "return self.n_ctx",
           ("tests/test_plan.py", "-k", "weights_kv_and_compute"), True),
    Mutant("compute-mask-forgotten", "smallfour/planner.py",
           "return cells * ub * (model.n_heads + 1) * 4 + cells * model.kv_lora_rank * 2",
           "return cells * ub * model.n_heads * 4 + cells * model.kv_lora_rank * 2",
           ("tests/test_plan.py", "-k", "weights_kv_and_compute"), True,
           "(the activations term is 1.25 % of the fixture's buffer: bugs in it are below what the CPU fixture resolves)"),
    Mutant("yarn-betas-swapped", "convert/writer.py",
           "writer.add_rope_scaling_yarn_beta_fast(cfg.yarn_beta_fast)",
           "writer.add_rope_scaling_yarn_beta_fast(cfg.yarn_beta_slow)",
           ("tests/test_gguf_metadata.py",), True),
    Mutant("native-yarn-alpha-beta", "convert/config.py", 'yarn_beta_fast=yarn.get("beta") if yarn else None,',
           'yarn_beta_fast=yarn.get("alpha") if yarn else None,', ("tests/test_gguf_metadata.py",), True),
    Mutant("stop-latest-cut", "smallfour/openai.py", "result.content = result.content[:min(cuts)]",
           "result.content = result.content[:max(cuts)]", ("tests/test_stop.py",), True),
    Mutant("stream-stop-latest-cut", "smallfour/openai.py", "out, self.pending = self.pending[:min(cuts)], \"\"",
           "out, self.pending = self.pending[:max(cuts)], \"\"", ("tests/test_stop.py",), True),
    Mutant("stream-stop-holds-too-little", "smallfour/openai.py",
           "self.hold = max(map(len, stop), default=1) - 1", "self.hold = max(map(len, stop), default=1) - 2",
           ("tests/test_stop.py",), True),
    # --- bugs the issue-18 tests were not written for --------------------------------------------
    Mutant("router-quantized", "quant/recipes.py", "F32_ROLES = frozenset({ROLE_NORM, ROLE_ROUTER})",
           "F32_ROLES = frozenset({ROLE_NORM})", RECIPES),
    Mutant("layers-percent-floor", "quant/recipes.py",
           "count = int(np.ceil(a * n_layers / 100)) if percent else int(a)",
           "count = int(a * n_layers / 100) if percent else int(a)", RECIPES),
    Mutant("no-kquant-fallback", "quant/recipes.py", "    if fallback is not None and row % GGML_QUANT_SIZES[fallback][0] == 0:",
           "    if False:", RECIPES),
    Mutant("images-in-any-role", "smallfour/messages.py", '        if role != "user":\n            raise MessageError(f"{where}: only',
           '        if role == "system":\n            raise MessageError(f"{where}: only',
           ("tests/test_cli.py", "-k", "only_user_messages or messages_files_are_checked")),
    Mutant("download-unverified", "smallfour/pull.py", "            if digest != remote.etag:",
           "            if not digest:", ("tests/test_pull.py", "-k", "corrupted")),
    Mutant("imatrix-unseen-expert-zero", "quant/imatrix.py",
           "sums / np.maximum(counts, 1)[:, None], np.float32(1.0))",
           "sums / np.maximum(counts, 1)[:, None], np.float32(0.0))",
           ("tests/test_imatrix.py", "-k", "never_routed or importance_rows or per_expert")),
    Mutant("grid-cells-floor", "smallfour/images.py", "return (width - 1) // step + 1, (height - 1) // step + 1",
           "return width // step + 1, height // step + 1", TOKEN_COUNT),
    Mutant("grid-no-img-end", "smallfour/vision.py", "    tokens[-1] = end\n", "", TOKEN_COUNT),
    Mutant("transparent-black", "smallfour/images.py", 'background = Image.new("RGBA", rgba.size, "WHITE")',
           'background = Image.new("RGBA", rgba.size, "BLACK")', ("tests/test_vision.py", "-k", "pillow_normalizes")),
    Mutant("think-budget-late", "smallfour/engine.py",
           'if stream.channel == "reasoning" and result.reasoning_tokens >= think_budget:',
           'if stream.channel == "reasoning" and result.reasoning_tokens > think_budget:', CONVERSATION),
    Mutant("tool-args-not-object", "smallfour/engine.py", "        if not isinstance(parsed, dict):",
           "        if parsed is None:", CONVERSATION),
    Mutant("kv-q8-unblocked", "smallfour/planner.py", "    return model.kv_width // block * size",
           "    return model.kv_width * size", ("tests/test_plan.py", "-k", "kv_cache_matches_the_brief")),
    Mutant("kv_b-halves-swapped", "convert/mistral4.py", 'if tensor.key == "attn_k_b":', 'if tensor.key == "attn_v_b":',
           ("tests/test_convert_logits.py::test_f32_logits_match_transformers[hf-bf16]",)),
    Mutant("expert-norm-dropped", "convert/writer.py", "writer.add_expert_weights_norm(cfg.norm_topk_prob)",
           "writer.add_expert_weights_norm(False)",
           ("tests/test_convert_logits.py::test_f32_logits_match_transformers[hf-bf16]",)),
    Mutant("cpu-experts-off-by-one", "smallfour/placement.py", "layers = \"|\".join(str(i) for i in range(count))",
           "layers = \"|\".join(str(i) for i in range(1, count + 1))",
           ("tests/test_placement.py", "-k", "pins_exactly or first_n_layers")),
    Mutant("override-split-first-equals", "smallfour/placement.py",
           'pattern, sep, device = text.rpartition("=")', 'pattern, sep, device = text.partition("=")',
           ("tests/test_placement.py", "-k", "contain_equals or power_user or placement_errors")),
]


def copy_sources(scratch: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, scratch / name, ignore=ignore)
        else:
            shutil.copy2(source, scratch / name)


def environment(scratch: Path) -> dict[str, str]:
    """The scratch copy first on the path, and a private fixture cache.

    The cache starts as hard links to the repository's fixtures (no copy, no rebuild when the hash
    matches); a fixture the copy hashes differently is built there, never over the shared one.
    """
    cache = scratch / ".cache"
    shared = Path(os.environ.get("SMALLFOUR_CACHE", REPO / ".cache")) / "fixtures"
    if shared.is_dir():
        cache.mkdir()
        subprocess.run(["cp", "-al", str(shared), str(cache / "fixtures")], check=True)
    return dict(os.environ, PYTHONPATH=str(scratch), PYTHONDONTWRITEBYTECODE="1", SMALLFOUR_CACHE=str(cache))


def check_imports(scratch: Path, env: dict[str, str]) -> None:
    probe = "import smallfour, convert, quant; print(smallfour.__file__, convert.__file__, quant.__file__)"
    out = subprocess.run([PYTHON, "-c", probe], cwd=scratch, env=env, capture_output=True, text=True, check=True).stdout
    if any(not Path(p).resolve().is_relative_to(scratch.resolve()) for p in out.split()):
        raise SystemExit(f"the packages do not come from the scratch copy: {out}")


def run_targets(scratch: Path, env: dict[str, str], targets: tuple[str, ...]) -> tuple[int, float, str]:
    start = time.monotonic()
    try:
        result = subprocess.run([PYTHON, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *targets], cwd=scratch,
                                env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        code, tail = result.returncode, (result.stdout + result.stderr).strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        code, tail = -1, ["timed out"]
    return code, time.monotonic() - start, " ".join(tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="mutant names")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:28} {'issue' if m.issue else 'other':6} {m.file}")
        return 0
    with tempfile.TemporaryDirectory(prefix="smallfour-mutants-") as tmp:
        scratch = Path(tmp)
        copy_sources(scratch)
        env = environment(scratch)
        check_imports(scratch, env)
        baseline: dict[tuple[str, ...], tuple[int, str]] = {}
        rows = []
        for m in chosen:
            path = scratch / m.file
            original = path.read_text()
            if original.count(m.old) != 1:
                rows.append((m, "stale", 0.0, f"the line to mutate occurs {original.count(m.old)} times"))
                print(f"{m.name}: stale (the code changed)", flush=True)
                continue
            if m.targets not in baseline:
                code, _, tail = run_targets(scratch, env, m.targets)
                baseline[m.targets] = (code, tail)
            if baseline[m.targets][0] != 0:
                rows.append((m, "baseline fails", 0.0, baseline[m.targets][1]))
                print(f"{m.name}: targets fail without the mutant ({baseline[m.targets][1]})", flush=True)
                continue
            path.write_text(original.replace(m.old, m.new))
            try:
                code, seconds, tail = run_targets(scratch, env, m.targets)
            finally:
                path.write_text(original)
            verdict = "caught" if code in (1, 2) else "MISSED" if code == 0 else f"error {code}"
            rows.append((m, verdict, seconds, tail))
            print(f"{m.name}: {verdict} in {seconds:.0f} s ({tail})", flush=True)
    print()
    for group, label in ((True, "issue-18 mutants"), (False, "other mutants")):
        scored = [r for r in rows if r[0].issue == group and r[1] in ("caught", "MISSED")]
        caught = sum(r[1] == "caught" for r in scored)
        if scored:
            print(f"{label}: {caught}/{len(scored)} caught ({100 * caught / len(scored):.0f} %)")
        for m, verdict, _, tail in rows:
            if m.issue == group and verdict != "caught":
                print(f"  {verdict}: {m.name} ({m.file}) {m.why or tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
