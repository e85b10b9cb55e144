"""Shared test helpers: a tiny checkpoint of the project's model, a runner for the scripts as users
run them, and a small synthetic attention capture (format v1) built without a model.

The project's `model` and `env` packages are imported inside the helpers, not here: tests/user_ad
brings packages of the same names, and the tests that use it must not find ours already imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The test models are tiny: one thread is faster than several, and leaves the other core free.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
TINY_ENV = {"name": "darkroom", "size": 3, "horizon": 5, "n_holdout": 2}  # 9 goals, 2 held out


def tiny_model(max_context: int = 20, seed: int = 0, **overrides):
    """A seeded, untrained 2-layer, 2-head, 16-wide AD model for the 3 x 3 room, in eval mode."""
    from model import ADConfig, ADTransformer

    torch.manual_seed(seed)
    cfg = dict(n_states=9, n_actions=5, horizon=5, max_context=max_context, n_layer=2, n_head=2, d_model=16, dropout=0.0) | overrides
    return ADTransformer(ADConfig(**cfg)).eval()


def save_tiny_checkpoint(path: Path, **model_kw) -> Path:
    """Write `tiny_model(**model_kw)` as `train.py` would (weights + resolved config), for the scripts."""
    from env import get_spec
    from model.checkpoint import save_atomic

    model, spec = tiny_model(**model_kw), get_spec(TINY_ENV)
    save_atomic({"model": model.state_dict(), "config": {"model": model.cfg.to_dict(), "env": spec.to_dict(), "train": {}}, "step": 0}, path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of `tiny_model()` (context 20) that every script accepts with --checkpoint."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def run_script(script: str, *args: str, cwd, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python ROOT/script args...` from `cwd`, as a user runs it (one torch thread); output captured."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def refused(capsys, main, argv: list[str], out: Path) -> str:
    """Run a script's `main` in-process as its command line does (`run_cli`); assert exit code 2, one
    'error:' line and nothing written to `out`; return that line. Much cheaper than a subprocess."""
    from adlens.config import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(main, argv + ["--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not out.exists(), f"{main.__module__} wrote {out} before refusing its input"
    return lines[0]


_HELP: dict[Path, str] = {}


def script_help(script: str | Path) -> str:
    """The `--help` text of a project script (path relative to the root), computed in-process once per
    test session: the script is loaded by path under a private name and its `main(["--help"])` run."""
    import contextlib
    import importlib.util
    import io

    path = (ROOT / script).resolve()
    if path not in _HELP:
        spec = importlib.util.spec_from_file_location(f"_help_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        buf, columns, argv = io.StringIO(), os.environ.get("COLUMNS"), sys.argv
        os.environ["COLUMNS"], sys.argv = "100", [path.name]  # argparse's width and program name
        try:
            with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
                module.main(["--help"])
        finally:
            sys.argv = argv
            if columns is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = columns
        assert e.value.code in (0, None), f"{script} --help failed"
        _HELP[path] = buf.getvalue()
    return _HELP[path]


MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1], [0, 0]])


def _profile(n: int, tau: float, sink: float) -> np.ndarray:
    """Attention over n positions (oldest first): exponential decay with distance from the newest,
    plus `sink` extra weight on position 0; sums to 1."""
    w = np.exp(-np.arange(n)[::-1] / tau)
    w = w / w.sum() * (1 - sink)
    w[0] += sink
    return w


def build_capture(
    S: int = 60,
    L: int = 2,
    H: int = 2,
    T: int = 24,
    horizon: int = 5,
    grid: int = 3,
    full_steps=None,
    taus=None,
    sink: float = 0.0,
    seed: int = 0,
) -> dict:
    """A valid capture dict (without the format/version keys that `save_capture` adds).

    Each layer/head attends with an exponential recency profile (time constants `taus`, shape (L, H));
    `sink` adds weight to the oldest token held. The agent random-walks a grid x grid room whose goal
    is the far corner; episodes last `horizon` steps. Full matrices default to steps S//6, S//2, S-1.
    """
    rng = np.random.default_rng(seed)
    full_steps = (S // 6, S // 2, S - 1) if full_steps is None else full_steps
    taus = np.broadcast_to(np.asarray(2.0 if taus is None else taus, dtype=float), (L, H))
    n = np.minimum(np.arange(S) + 1, T)
    ctx_step = np.full((S, T), -1)
    query = np.zeros((S, L, H, T))
    for s in range(S):
        ctx_step[s, : n[s]] = np.arange(s - n[s] + 1, s + 1)
        for li in range(L):
            for h in range(H):
                query[s, li, h, : n[s]] = _profile(n[s], taus[li, h], sink)
    start, goal = np.array([grid // 2] * 2), np.array([grid - 1] * 2)
    state, action, reward = np.zeros(S, int), rng.integers(0, 5, S), np.zeros(S)
    pos = start.copy()
    for s in range(S):
        if s % horizon == 0:
            pos, r = start.copy(), 0.0
        state[s], reward[s] = pos[0] * grid + pos[1], r
        pos = np.clip(pos + MOVES[action[s]], 0, grid - 1)
        r = float((pos == goal).all())
    full = []
    for k in full_steps:
        m = np.zeros((L, H, n[k], n[k]))
        for li in range(L):
            for h in range(H):
                for q in range(n[k]):
                    m[li, h, q, : q + 1] = _profile(q + 1, taus[li, h], sink)
        full.append(torch.tensor(m, dtype=torch.float32))
    episode = np.arange(S) // horizon
    return {
        "meta": {
            "checkpoint": "synthetic",
            "env": {"name": "darkroom", "size": grid, "horizon": horizon},
            "task": {"goal": goal.tolist()},
            "seed": seed,
            "greedy": True,
            "eval_timesteps": S,
            "max_context": T,
            "horizon": horizon,
            "n_layer": L,
            "n_head": H,
            "layer_names": [f"blocks.{i}.attn" for i in range(L)],
            "grid_size": grid,
        },
        "query_attn": torch.tensor(query, dtype=torch.float16),
        "context_len": torch.tensor(n, dtype=torch.long),
        "ctx_step": torch.tensor(ctx_step, dtype=torch.long),
        "state": torch.tensor(state, dtype=torch.long),
        "action": torch.tensor(action, dtype=torch.long),
        "reward": torch.tensor(reward, dtype=torch.float32),
        "episode": torch.tensor(episode, dtype=torch.long),
        "timestep": torch.tensor(np.arange(S) % horizon, dtype=torch.long),
        "full_steps": torch.tensor(list(full_steps), dtype=torch.long),
        "full_attn": full,
        "returns": torch.tensor(np.bincount(episode, weights=reward), dtype=torch.float32),
    }


@pytest.fixture
def make_capture():
    """The `build_capture` function, for tests that need a synthetic capture."""
    return build_capture
