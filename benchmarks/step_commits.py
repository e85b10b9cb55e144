"""The cached step of two commits, side by side: what a change to the step did to its speed.

    python benchmarks/step_commits.py                                    # HEAD~1 against the working tree, 8 and 256 envs
    python benchmarks/step_commits.py --base 8047c57 --new HEAD --envs 8 --rounds 80 --pairs 8
    python benchmarks/step_commits.py --configs none topk:0.5:keep_recent=20

Each side runs in its own worker process on the project's code at that revision (`git archive`;
`--new .` is the working tree as it is), both on the same checkpoint and the same random tokens,
with a KV engine (`none`, or a compression `strategy:ratio[:param=value...]` as in
benchmarks/rl_compression.py, interval 20) filled past its context first. The two workers then
run `steps`-step blocks in turn, the order flipped every round (ABAB), each with the other idle:
both sides meet the machine in the same seconds, which a comparison of separate runs cannot give
on a machine whose speed drifts from minute to minute. A process also keeps a speed of its own for
its life (where its memory landed), so this is done by `pairs` fresh pairs of workers, the rounds
split among them. Reported per batch and configuration: ms per step of each side, speedup = summed
base time / summed new time, the standard error and range of the per-pair speedups (of the
per-round ratios with one pair), and the largest difference between the two sides' logits over
the last 10 warm-up steps (0 for a change that keeps the arithmetic). Needs git; the revisions must
have `model.rollout.KVEngine`, `benchmarks.compaction_cost` and `benchmarks.rl_compression`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adlens.config import add_config_flags, resolve, run_cli  # noqa: E402
from adlens.errors import UserError  # noqa: E402
from adlens.io import finish_result  # noqa: E402
from benchmarks.rl_compression import parse_config  # noqa: E402
from model.checkpoint import checkpoint_path  # noqa: E402

CONFIG = {
    "base": "HEAD~1",  # the revision measured against (a commit, tag or branch)
    "new": ".",  # the revision measured ("." = the working tree, uncommitted changes included)
    "checkpoint": "default",  # model.pt both sides load (default: the shipped model)
    "envs": [8, 256],  # parallel sequences (batch)
    "configs": ["none"],  # none | strategy:ratio[:param=value...]
    "rounds": 40,  # alternated rounds per batch and configuration, split among the pairs
    "pairs": 4,  # fresh pairs of worker processes per batch and configuration
    "steps": 0,  # steps per block (0: 800 / envs, at least 10)
    "threads": 1,  # torch CPU threads of each worker
    "out": "",  # write the rows as JSON here
}
BOUNDS = {"envs": (1, 65_536), "rounds": (2, 100_000), "pairs": (1, 1000), "steps": (0, 10**6), "threads": (1, 1024)}

# The worker: the step of one revision. argv: source dir, checkpoint, envs, config, threads. It
# fills the engine, prints the last 10 warm-up steps' logits as JSON, then for each line "N" on
# stdin runs N more steps and prints their seconds.
WORKER = r"""
import json, sys, time
src, ckpt, B, spec, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
sys.path.insert(0, src)
import torch
torch.set_num_threads(threads)
from benchmarks.compaction_cost import _tokens
from benchmarks.rl_compression import parse_config
from model.checkpoint import load_model
from model.rollout import KVEngine
model, _ = load_model(ckpt)
T = model.cfg.max_context
tokens = [_tokens(model.cfg, B, t) for t in range(T + 60)]
with torch.inference_mode():
    engine = KVEngine(model, B, None if spec == "none" else parse_config(spec, 20, T)[2])
    last = []
    for t, tok in enumerate(tokens):
        logits = engine.step(tok)
        if t >= len(tokens) - 10:
            last.append(logits.tolist())
    print(json.dumps(last), flush=True)
    t = 0
    for line in sys.stdin:
        n = int(line)
        t0 = time.perf_counter()
        for _ in range(n):
            engine.step(tokens[t % len(tokens)])
            t += 1
        print(time.perf_counter() - t0, flush=True)
"""


def _source(rev: str, into: Path) -> tuple[Path, str]:
    """The project's files at `rev` (or the working tree for "."), and the commit they are."""
    if rev == ".":
        return ROOT, "working tree"
    git = ["git", "-C", str(ROOT)]
    sha = subprocess.run([*git, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], capture_output=True, text=True)
    if sha.returncode != 0:
        raise UserError(f"--base/--new {rev!r} is not a commit of this repository (git rev-parse found none)")
    sha = sha.stdout.strip()
    into.mkdir(parents=True)
    archive = subprocess.run([*git, "archive", "--format=tar", sha], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))  # the filter from Python 3.11.4 on
    return into, sha[:10]


class Worker:
    """One side's step in its own process (see `WORKER`)."""

    def __init__(self, src: Path, ckpt: Path, envs: int, spec: str, threads: int):
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONDONTWRITEBYTECODE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(src), str(ckpt), str(envs), spec, str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        self.logits: np.ndarray | None = None

    def ready(self) -> Worker:
        """Wait for the engine to be filled; keep the last warm-up logits."""
        self.logits = np.array(json.loads(self._read()))
        return self

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().strip().splitlines()
            raise UserError(f"a worker stopped: {err[-1] if err else 'no message'} (does that revision have what this benchmark needs?)")
        return line

    def run(self, steps: int) -> float:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return float(self._read())

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def alternate(base: Worker, new: Worker, steps: int, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of each side's `steps`-step blocks, `rounds` of them in turn (ABAB), after one warm-up block each."""
    for w in (base, new):
        w.run(steps)
    times = {"base": [], "new": []}
    for r in range(rounds):
        for name in ("base", "new") if r % 2 == 0 else ("new", "base"):
            times[name].append((base if name == "base" else new).run(steps))
    return times["base"], times["new"]


def rounds_per_pair(cfg: dict) -> int:
    return max(2, cfg["rounds"] // cfg["pairs"])


def measure(sources: tuple[Path, Path], ckpt: Path, envs: int, spec: str, cfg: dict, steps: int) -> dict:
    """`pairs` fresh pairs of workers, each alternating `rounds_per_pair` rounds. A process keeps its own
    speed for its whole life (where its memory landed, which core it runs on), so one pair can favour a
    side by more than its rounds' spread shows; the standard error is taken over the pairs."""
    pairs, rounds = cfg["pairs"], rounds_per_pair(cfg)
    b_all, n_all, per_pair, per_round, diff = [], [], [], [], 0.0
    for _ in range(pairs):
        base, new = [Worker(src, ckpt, envs, spec, cfg["threads"]) for src in sources]  # both start at once
        try:
            b, n = alternate(base.ready(), new.ready(), steps, rounds)
            diff = max(diff, float(np.abs(base.logits - new.logits).max()))
        finally:
            base.close()
            new.close()
        b_all += b
        n_all += n
        per_pair.append(sum(b) / sum(n))
        per_round += [x / y for x, y in zip(b, n)]
    spread = np.array(per_pair if pairs > 1 else per_round)
    return {"envs": envs, "config": spec, "steps": steps, "pairs": pairs, "rounds_per_pair": rounds,
            "base_ms": 1000 * sum(b_all) / (len(b_all) * steps), "new_ms": 1000 * sum(n_all) / (len(n_all) * steps),
            "speedup": sum(b_all) / sum(n_all), "speedup_se": float(spread.std(ddof=1) / np.sqrt(len(spread))),
            "pair_speedups": per_pair, "speedup_min": float(spread.min()), "speedup_max": float(spread.max()), "max_logit_diff": diff}  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, CONFIG)
    cfg = resolve(CONFIG, p.parse_args(argv), bounds=BOUNDS)
    for spec in cfg["configs"]:
        if spec != "none":
            parse_config(spec, 20, 240)  # a one-line error for a bad configuration, before any worker starts
    ckpt = checkpoint_path(cfg["checkpoint"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        (base_src, base_sha), (new_src, new_sha) = (_source(cfg[k], Path(tmp) / k) for k in ("base", "new"))
        print(
            f"base {cfg['base']} ({base_sha}) against new {cfg['new']} ({new_sha}), {cfg['threads']} thread(s), "
            f"{cfg['pairs']} worker pairs x {rounds_per_pair(cfg)} rounds"
        )
        print(f"{'envs':>5}  {'configuration':<34} {'base ms':>8} {'new ms':>8}  speedup [pairs]   +- se   logits differ by")
        for envs in cfg["envs"]:
            steps = cfg["steps"] or max(10, 800 // envs)
            for spec in cfg["configs"]:
                row = measure((base_src, new_src), ckpt, envs, spec, cfg, steps)
                rows.append(row)
                print(f"{envs:>5}  {spec:<34} {row['base_ms']:>8.3f} {row['new_ms']:>8.3f}  {row['speedup']:.3f}x [{row['speedup_min']:.2f}-"
                      f"{row['speedup_max']:.2f}]  {row['speedup_se']:.3f}  {row['max_logit_diff']:.1e}")  # fmt: skip
    result = {"config": cfg, "revisions": {"base": base_sha, "new": new_sha}, "rows": rows}
    return finish_result("ad-benchmark-step-commits", result, cfg["out"])


if __name__ == "__main__":
    run_cli(main)
