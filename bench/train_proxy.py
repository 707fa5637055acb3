"""A proxy of Mistral Small 4 with the real proportions, trained briefly (deterministic, CPU, minutes).

    .venv/bin/python bench/train_proxy.py [--steps 150] [--report]

The trained fixture of tests/data/trained-fixture/ is 95 % embeddings and output (the
131072-token vocabulary on a 256-wide network), where Mistral Small 4 is ≈97 % routed
experts, so recipe choices for experts barely show on it. This proxy keeps the real
architecture (transformers' `Mistral4ForCausalLM`: MLA attention, first layer dense,
softmax router with normalised top-k, one shared expert) and shrinks the vocabulary
instead: a Tekken v15 tokenizer truncated to its first VOCAB_SIZE ids (the 1000 special
tokens of the release plus the 3096 highest-priority BPE merges; mistral-common, the
converter and llama.cpp take any size). With 64 routed experts of 256 (4 active) in 3 of
4 layers, routed experts are ≈91 % of the text weights.

Training: Python standard-library source (the files of bench/train_fixture.py), AdamW,
cosine schedule, a weak switch-style balancing loss (AUX_WEIGHT) so routing stays uneven
as in a real MoE. Deterministic: fixed seeds, one thread, deterministic algorithms.

`proxy_checkpoint()` trains once and caches an ordinary HF-layout checkpoint under
`$SMALLFOUR_CACHE/fixtures/proxy-<hash>/` (default `.cache/` of the repository here), the
hash covering this file, the fixture builders, the step count and the Python/torch
versions; beside the checkpoint: `calibration.txt`, `heldout.txt` and `train.json` (loss,
time, the expert-load histogram on held-out text). `--report` prints that histogram.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "bench"))  # after REPO: bench/convert.py must not shadow convert/
os.environ.setdefault("SMALLFOUR_CACHE", str(REPO / ".cache"))

from quant.recipes import bf16_bits  # noqa: E402
from smallfour.fixtures.checkpoint import FixtureSpec, cached_build, default_cache_dir, hf_config, text_weights, write_hf_layout  # noqa: E402
from smallfour.fixtures.tokenizer import NUM_SPECIAL_TOKENS, write_tekken_v15  # noqa: E402
from train_fixture import CALIBRATION_FILE, HELDOUT_FILES, TRAIN_FILES, stdlib_text  # noqa: E402

VOCAB_SIZE = 4096
SPEC = FixtureSpec(vocab_size=VOCAB_SIZE, hidden_size=256, n_layers=4, n_heads=4, q_lora_rank=64, kv_lora_rank=32,
                   qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=64, n_experts=64, n_experts_used=4,
                   expert_ff=256, dense_ff=512, n_shared_experts=1, first_dense_layers=1, shards=1, seed=0)
STEPS = 150
SEQ_LEN = 128
BATCH = 16
LR = 3e-3
AUX_WEIGHT = 0.002
TEXT_CHARS = 40_000
TRAIN_JSON = "train.json"


def write_small_tekken(path: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """The v15 tekken.json with its BPE vocabulary cut to `vocab_size` ids in all (specials included)."""
    write_tekken_v15(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["config"]["default_vocab_size"] = vocab_size
    data["vocab"] = data["vocab"][: vocab_size - NUM_SPECIAL_TOKENS]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def weight_counts(spec: FixtureSpec = SPEC) -> dict[str, int]:
    """Text weights by role (numbers of parameters), from the fixture's own initialiser shapes."""
    counts = {"routed experts": 0, "shared expert": 0, "dense FFN": 0, "attention": 0, "embeddings+output": 0,
              "norms+router": 0}
    for name, value in text_weights(spec).items():
        role = ("embeddings+output" if name in ("embed_tokens.weight", "lm_head.weight") else
                "routed experts" if ".mlp.experts." in name else
                "shared expert" if "shared_experts" in name else
                "norms+router" if (value.ndim == 1 or ".mlp.gate." in name) else
                "dense FFN" if ".mlp." in name else "attention")
        counts[role] += int(value.size)
    return counts


def train(directory: Path, steps: int = STEPS, log=print) -> dict:
    import torch
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from transformers import Mistral4Config, Mistral4ForCausalLM
    from transformers.models.mistral4.modeling_mistral4 import Mistral4TopkRouter

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    directory.mkdir(parents=True, exist_ok=True)
    write_small_tekken(directory / "tekken.json")
    tokenizer = Tekkenizer.from_file(directory / "tekken.json")
    assert tokenizer.n_words == VOCAB_SIZE, tokenizer.n_words
    stream = []
    for name in TRAIN_FILES:
        stream += tokenizer.encode(stdlib_text(name), bos=False, eos=False)
    data = torch.tensor(stream)
    heldout = "".join(stdlib_text(n) for n in HELDOUT_FILES)[:TEXT_CHARS]
    held = torch.tensor(tokenizer.encode(heldout, bos=False, eos=False))
    log(f"{len(stream)} training tokens, {len(set(stream))} distinct of {VOCAB_SIZE}")

    model = Mistral4ForCausalLM(Mistral4Config(**hf_config(SPEC)["text_config"])).float()
    init = text_weights(SPEC)
    init["embed_tokens.weight"] *= 0.1
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): torch.from_numpy(v) for k, v in init.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)

    router_logits = []
    for module in model.modules():
        if isinstance(module, Mistral4TopkRouter):
            module.register_forward_hook(lambda _m, _i, out: router_logits.append(out[0]))

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    warmup = max(1, steps // 15)
    start = time.time()
    model.train()
    losses = []
    for step in range(steps):
        lr = LR * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - SEQ_LEN, (BATCH,), generator=generator)
        batch = torch.stack([data[s: s + SEQ_LEN] for s in starts.tolist()])
        batch[:, 0] = 1  # <s>, as llama.cpp puts it first
        router_logits.clear()
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        aux = 0.0
        for scores in router_logits:
            probs = scores.softmax(-1)
            chosen = torch.zeros_like(probs).scatter(1, probs.topk(SPEC.n_experts_used, -1).indices, 1.0)
            aux = aux + SPEC.n_experts * (chosen.mean(0) / SPEC.n_experts_used * probs.mean(0)).sum()
        optimizer.zero_grad()
        (loss + AUX_WEIGHT * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {loss.item():.3f}  aux {float(aux.detach()):.3f}  lr {lr:.2e}  "
                f"{time.time() - start:.0f}s")
    seconds = time.time() - start

    # Expert load and held-out loss, on held-out text in chunks of SEQ_LEN.
    model.eval()
    counts = np.zeros((SPEC.n_layers - SPEC.first_dense_layers, SPEC.n_experts), dtype=np.int64)
    nll, positions, correct = 0.0, 0, 0
    with torch.no_grad():
        for first in range(0, len(held) - SEQ_LEN, SEQ_LEN):
            chunk = held[first:first + SEQ_LEN].clone()
            chunk[0] = 1
            router_logits.clear()
            logits = model(input_ids=chunk[None, :-1]).logits[0]
            nll += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
            correct += int((logits.argmax(-1) == chunk[1:]).sum())
            positions += SEQ_LEN - 1
            for layer, scores in enumerate(router_logits):
                chosen = scores.softmax(-1).topk(SPEC.n_experts_used, -1).indices.reshape(-1).numpy()
                counts[layer] += np.bincount(chosen, minlength=SPEC.n_experts)

    text = {name: ("BF16", bf16_bits(value.detach().float().numpy()))
            for name, value in ((k.removeprefix("model."), v) for k, v in model.state_dict().items())
            if "rotary" not in name}
    write_hf_layout(directory, SPEC, text, np.random.default_rng(SPEC.seed + 1))
    (directory / "calibration.txt").write_text(stdlib_text(CALIBRATION_FILE)[:TEXT_CHARS])
    (directory / "heldout.txt").write_text(heldout)
    report = {"steps": steps, "seconds": round(seconds, 1), "train_tokens": len(stream),
              "first_loss": round(losses[0], 4), "final_loss": round(float(np.mean(losses[-10:])), 4),
              "heldout_loss": round(nll / positions, 4), "heldout_top1": round(correct / positions, 4),
              "weights": weight_counts(), "expert_load": counts.tolist()}
    (directory / TRAIN_JSON).write_text(json.dumps(report, indent=1) + "\n")
    return report


def content_hash(steps: int) -> str:
    import torch

    digest = hashlib.sha256(f"{steps} {sys.version_info[:2]} {torch.__version__}".encode())
    for source in [Path(__file__), REPO / "bench" / "train_fixture.py", REPO / "convert" / "safetensors.py",
                   *sorted((REPO / "smallfour" / "fixtures").glob("*.py"))]:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def proxy_checkpoint(steps: int = STEPS, cache_dir: Path | None = None, log=print) -> Path:
    """The trained proxy's HF checkpoint directory, trained once per content of this code."""
    return cached_build(Path(cache_dir or default_cache_dir()), "proxy", content_hash(steps),
                        lambda staging: train(staging, steps, log))


def load_histogram(report: dict) -> str:
    """Per MoE layer: share of routed slots taken by the busiest/idlest experts, and a coarse histogram."""
    lines = []
    for layer, row in enumerate(report["expert_load"], start=SPEC.first_dense_layers):
        load = np.array(row, dtype=float)
        share = np.sort(load / load.sum())[::-1]
        uniform = 1 / len(load)
        buckets = np.histogram(share / uniform, bins=[0, 0.25, 0.5, 1, 2, 4, np.inf])[0]
        lines.append(f"layer {layer}: max {share[0] / uniform:.2f}× uniform, min {share[-1] / uniform:.2f}×, "
                     f"top 8 experts {share[:8].sum():.0%} of slots, unused {int((load == 0).sum())}; experts at "
                     f"<¼ {buckets[0]}, ¼-½ {buckets[1]}, ½-1 {buckets[2]}, 1-2 {buckets[3]}, 2-4 {buckets[4]}, "
                     f">4× uniform {buckets[5]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--report", action="store_true", help="print the training report and expert loads")
    args = parser.parse_args()
    path = proxy_checkpoint(args.steps, log=lambda m: print(m, flush=True))
    report = json.loads((path / TRAIN_JSON).read_text())
    total = sum(report["weights"].values())
    print(f"{path}\n{total / 1e6:.1f} M text weights; " + ", ".join(
        f"{k} {v / total:.1%}" for k, v in report["weights"].items()))
    print(f"{report['steps']} steps in {report['seconds']:.0f}s, loss {report['first_loss']:.2f} → "
          f"{report['final_loss']:.2f}, held-out {report['heldout_loss']:.2f} (top-1 {report['heldout_top1']:.1%})")
    if args.report:
        print(load_histogram(report))


if __name__ == "__main__":
    main()
