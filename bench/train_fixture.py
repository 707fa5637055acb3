"""Train the tiny Mistral Small 4 of tests/data/trained-fixture/ (deterministic, CPU, a few minutes).

    .venv/bin/python bench/train_fixture.py [--steps 300] [--out tests/data/trained-fixture]

The network is transformers' own `Mistral4ForCausalLM` with the architecture of
Mistral Small 4 at toy size (MLA attention, 8 routed experts of which 2 are
active, one shared expert, softmax router with normalised top-k). Every row
length that K-quants care about is a multiple of 256 (hidden 256, expert and
shared FFN 256, 4 heads × v_head_dim 64 into `o_proj`).

Text: Python standard-library source (PSF licence), tokenized with the real
Tekken v15 tokenizer. The vocabulary stays the released 131072 tokens, but only
tokens seen at least MIN_COUNT times get their own embedding/output row; all the
others share one row. Training treats them as one class whose logit is
offset by log(number of tokens sharing it), which is exactly the softmax of
the full-vocabulary network the shared rows describe, so the expansion in
`smallfour/fixtures/trained.py` is lossless. A small switch-style load-balancing
loss keeps all experts in use, so per-expert statistics differ meaningfully.

Deterministic: fixed seeds, one thread, `torch.use_deterministic_algorithms`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from convert.safetensors import write_safetensors  # noqa: E402
from quant.recipes import bf16_bits  # noqa: E402
from smallfour.fixtures import trained  # noqa: E402
from smallfour.fixtures.checkpoint import FixtureSpec, hf_config, text_weights  # noqa: E402
from smallfour.fixtures.tokenizer import write_tekken_v15  # noqa: E402

SPEC = FixtureSpec(hidden_size=256, n_layers=2, n_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
                   qk_nope_head_dim=32, v_head_dim=64, n_experts=8, n_experts_used=2, expert_ff=256,
                   n_shared_experts=1, shards=1, seed=0)
TRAIN_FILES = ["textwrap.py", "string.py", "shlex.py", "fractions.py", "heapq.py", "bisect.py", "difflib.py",
               "calendar.py", "argparse.py", "csv.py", "pprint.py", "statistics.py", "random.py", "ftplib.py",
               "smtplib.py", "tarfile.py", "configparser.py", "inspect.py"]
CALIBRATION_FILE = "zipfile.py"  # not trained on; imatrix calibration text
HELDOUT_FILES = ["gettext.py", "netrc.py", "sched.py", "queue.py"]  # not trained on; quality measurements
TEXT_CHARS = 40_000  # of each of calibration and held-out text kept in the repo
MIN_COUNT = 3
SEQ_LEN = 128
BATCH = 16
AUX_WEIGHT = 0.01


def stdlib_text(name: str) -> str:
    return (Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / name).read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=trained.DATA_DIR)
    args = parser.parse_args()

    import torch
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from transformers import Mistral4Config, Mistral4ForCausalLM
    from transformers.models.mistral4.modeling_mistral4 import Mistral4TopkRouter

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    args.out.mkdir(parents=True, exist_ok=True)
    tekken_path = args.out / ".tekken.json"
    write_tekken_v15(tekken_path)
    tokenizer = Tekkenizer.from_file(tekken_path)
    tekken_path.unlink()
    stream = []
    for name in TRAIN_FILES:
        stream += tokenizer.encode(stdlib_text(name), bos=False, eos=False)
    counts = Counter(stream)
    kept = sorted({t for t, c in counts.items() if c >= MIN_COUNT} | {1})
    compact = np.zeros(131072, dtype=np.int64)  # vocab id → compact row (0 = shared row)
    compact[kept] = np.arange(1, len(kept) + 1)
    n_shared = SPEC.vocab_size - len(kept)
    data = torch.tensor(compact[np.array(stream)])
    print(f"{len(stream)} training tokens, {len(counts)} distinct, {len(kept)} kept with own rows", flush=True)

    text_config = hf_config(SPEC)["text_config"] | {"vocab_size": len(kept) + 1}
    config = Mistral4Config(**text_config)
    model = Mistral4ForCausalLM(config).float()
    init = text_weights(SPEC)
    rows = np.concatenate([[0], kept])
    init["embed_tokens.weight"] = init["embed_tokens.weight"][rows] * 0.1
    init["lm_head.weight"] = init["lm_head.weight"][rows]
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): torch.from_numpy(v)
             for k, v in init.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)

    router_logits = []
    for module in model.modules():
        if isinstance(module, Mistral4TopkRouter):
            module.register_forward_hook(lambda _m, _i, out: router_logits.append(out[0]))

    offset = torch.zeros(len(kept) + 1)
    offset[0] = math.log(n_shared)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    warmup = max(1, args.steps // 15)
    start = time.time()
    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - SEQ_LEN, (BATCH,), generator=generator)
        batch = torch.stack([data[s: s + SEQ_LEN] for s in starts.tolist()])
        batch[:, 0] = int(compact[1])  # <s>, as llama.cpp puts it first
        router_logits.clear()
        logits = model(input_ids=batch[:, :-1]).logits + offset
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
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  aux {float(aux.detach()):.3f}  lr {lr:.2e}  "
                  f"{time.time() - start:.0f}s", flush=True)

    stored: dict[str, tuple[str, np.ndarray]] = {}
    for name, value in model.state_dict().items():
        if "rotary" in name:
            continue
        key = name.removeprefix("model.")
        key = {"embed_tokens.weight": "embed_tokens.rows", "lm_head.weight": "lm_head.rows"}.get(key, key)
        stored[key] = ("BF16", bf16_bits(value.detach().float().numpy()))
    stored["token_ids"] = ("I32", np.array(kept, dtype=np.int32))
    write_safetensors(args.out / trained.WEIGHTS, stored, {"format": "compact", "steps": str(args.steps),
                                                           "final_loss": f"{loss.item():.4f}"})
    (args.out / trained.SPEC).write_text(json.dumps(dataclasses.asdict(SPEC), indent=2) + "\n")
    (args.out / trained.CALIBRATION).write_text(stdlib_text(CALIBRATION_FILE)[:TEXT_CHARS])
    (args.out / trained.HELDOUT).write_text("".join(stdlib_text(n) for n in HELDOUT_FILES)[:TEXT_CHARS])
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) after {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
