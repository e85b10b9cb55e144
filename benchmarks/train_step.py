"""A training step with attention dropout against one without, side by side, interleaved.

    python benchmarks/train_step.py                           # 240 transitions, batch 32, 1 thread
    python benchmarks/train_step.py --context 1000 --batch-size 8 --rounds 3

Dropout on the attention weights (`attn_dropout` > 0, the default: it follows `dropout`) makes
`scaled_dot_product_attention` on a CPU fall back to its explicit path, which materialises the
(B, H, T, T) weights for forward and backward; with `attn_dropout` 0 the fused kernel runs. Both
models have the same weights, the same residual and embedding dropout, and see the same batch
(random tokens: the cost does not depend on what the tokens are). Each round times `steps` full
training steps (forward, per-position cross-entropy, backward, gradient clip, AdamW) of one
variant, then of the other, in alternating order (ABBA). Reported: ms per step, and the speedup =
summed time with attention dropout / summed time without, with its per-round spread.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adlens.config import add_config_flags, resolve, run_cli  # noqa: E402
from adlens.errors import UserError  # noqa: E402
from adlens.io import finish_result  # noqa: E402
from model.ad import ADConfig, ADTransformer, Tokens  # noqa: E402

CONFIG = {
    "context": 240,  # transitions per window
    "batch_size": 32,  # windows per step
    "dropout": 0.1,  # residual and embedding dropout (both variants)
    "attn_dropout": 0.1,  # the baseline's attention dropout (the variant has 0)
    "steps": 5,  # timed steps per round and variant
    "rounds": 4,  # interleaved rounds
    "threads": 1,  # torch CPU threads
    "out": "",  # write the results as JSON here
}
BOUNDS = {"context": (1, 100_000), "batch_size": (1, 65_536), "steps": (1, 10_000), "rounds": (1, 1000), "threads": (1, 1024)}


def _batch(cfg: ADConfig, B: int, T: int, seed: int = 0) -> tuple[Tokens, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tok = Tokens(
        torch.randint(0, cfg.n_states, (B, T), generator=g), torch.randint(0, cfg.n_actions + 1, (B, T), generator=g),
        torch.randint(0, 2, (B, T), generator=g).float(), torch.arange(T).remainder(cfg.horizon).expand(B, T).contiguous(),
    )  # fmt: skip
    return tok, torch.randint(0, cfg.n_actions, (B, T), generator=g)


def _steps(model, opt, tok, tgt, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        loss = F.cross_entropy(model(tok).flatten(0, 1), tgt.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, CONFIG)
    cfg = resolve(CONFIG, p.parse_args(argv), bounds=BOUNDS)
    for key in ("dropout", "attn_dropout"):
        if not 0.0 <= cfg[key] < 1.0:
            raise UserError(f"--{key.replace('_', '-')} must be in [0, 1), got {cfg[key]}")
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    base_cfg = ADConfig(max_context=cfg["context"], grid_size=9, dropout=cfg["dropout"], attn_dropout=cfg["attn_dropout"])
    models = {"attn_dropout": ADTransformer(base_cfg)}
    models["fused"] = copy.deepcopy(models["attn_dropout"])
    for blk in models["fused"].blocks:
        blk.attn.dropout = 0.0
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    tok, tgt = _batch(base_cfg, cfg["batch_size"], cfg["context"])
    for k in models:  # warm-up
        _steps(models[k].train(), opts[k], tok, tgt, 1)
    times: dict[str, list[float]] = {k: [] for k in models}
    for rnd in range(cfg["rounds"]):
        for k in ("attn_dropout", "fused") if rnd % 2 == 0 else ("fused", "attn_dropout"):
            times[k].append(_steps(models[k], opts[k], tok, tgt, cfg["steps"]) / cfg["steps"])
    ratio = np.array(times["attn_dropout"]) / np.array(times["fused"])
    result = {
        "date": str(datetime.date.today()), "torch": torch.__version__, "cores": os.cpu_count(), "config": cfg,
        "ms_per_step": {k: 1000 * float(np.mean(v)) for k, v in times.items()},
        "speedup": float(np.sum(times["attn_dropout"]) / np.sum(times["fused"])),
        "speedup_min": float(ratio.min()), "speedup_max": float(ratio.max()),
    }  # fmt: skip
    ms = result["ms_per_step"]
    print(f"{result['date']}  torch {torch.__version__}, {cfg['threads']} thread(s), batch {cfg['batch_size']} x {cfg['context']} transitions, "
          f"{cfg['rounds']} rounds x {cfg['steps']} steps")  # fmt: skip
    print(f"attention dropout {cfg['attn_dropout']}: {ms['attn_dropout']:.0f} ms/step; attention dropout 0 (fused kernel): {ms['fused']:.0f} ms/step")
    print(f"speedup {result['speedup']:.2f}x [{result['speedup_min']:.2f}-{result['speedup_max']:.2f}]")
    return finish_result("ad-benchmark-train-step", result, cfg["out"])


if __name__ == "__main__":
    run_cli(main)
