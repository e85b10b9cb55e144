"""The tensor environments and the on-device rollout compute what the host loop computes."""

import numpy as np
import pytest
import torch

from conftest import TINY_ENV, tiny_model
from env import get_spec
from env.batched import BatchedGridEnv
from env.torch_grid import TorchGridEnv


@pytest.mark.parametrize("name", ["darkroom", "darkroom_permuted", "key_to_door"])
def test_tensor_env_steps_like_the_batched_env(name):
    spec = get_spec({"name": name})
    tasks = spec.tasks()[:: max(1, len(spec.tasks()) // 9)][:9]
    host, dev = BatchedGridEnv(spec, tasks), TorchGridEnv(spec, tasks)
    np.testing.assert_array_equal(spec.state_index(host.reset()), dev.reset_().numpy())
    rng = np.random.default_rng(0)
    total = 0.0
    for _ in range(spec.horizon * 3):
        # biased towards one corner, so that goals, keys and doors are actually reached
        actions = rng.choice(5, len(tasks), p=[0.35, 0.1, 0.35, 0.1, 0.1])
        obs, rewards, _, _ = host.step(actions)
        got = dev.step_(torch.as_tensor(actions))
        np.testing.assert_array_equal(got.numpy(), rewards)
        np.testing.assert_array_equal(dev.state().numpy(), spec.state_index(obs))  # reset at the horizon included
        total += rewards.sum()
    assert total > 0


def _tokens(ro):
    from model.ad import Tokens

    B = ro.B
    return Tokens(ro.env.state().view(B, 1).clone(), ro.prev_a.clone(), ro.prev_r.clone(), (ro.t % ro.H).expand(B, 1).clone())


@pytest.mark.parametrize("grid", [0, 3])
def test_device_step_equals_the_cached_step_before_and_after_the_window_slides(grid):
    from model.device_rollout import DeviceRollout

    spec = get_spec(TINY_ENV)
    model = tiny_model(max_context=12, grid_size=grid)
    ro = DeviceRollout(model, TorchGridEnv(spec, spec.tasks()), n_episodes=6, seed=1)
    cache = model.new_cache(ro.B)
    with torch.inference_mode():
        for _ in range(ro.n_steps):  # 30 steps through a 12-slot window
            want = model.step(_tokens(ro), cache)
            torch.testing.assert_close(ro.step_(), want, atol=1e-5, rtol=0)
    assert cache.full and cache.n_added == 30


@pytest.mark.parametrize("greedy", [True, False])
def test_device_rollout_returns_equal_run_episodes(greedy):
    from model.device_rollout import run_on_device
    from model.rollout import run_episodes

    spec = get_spec(TINY_ENV)
    model, tasks = tiny_model(max_context=12), spec.tasks() * 3
    want = run_episodes(model, BatchedGridEnv(spec, tasks), spec, 6, engine="kv", greedy=greedy, seed=5)
    got = run_on_device(model, TorchGridEnv(spec, tasks), 6, greedy=greedy, seed=5)
    np.testing.assert_array_equal(got["returns"], want["returns"])
    assert got["mean_context_length"] == pytest.approx(want["mean_context_length"])
    assert got["returns"].sum() > 0


def test_device_rollout_refusals():
    from adlens.errors import ConfigError
    from model.device_rollout import run_on_device

    spec = get_spec(TINY_ENV)
    env = TorchGridEnv(spec, spec.tasks())
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        run_on_device(tiny_model(), env, 2, graph=True)
    with pytest.raises(ConfigError, match="episodes must be >= 1"):
        run_on_device(tiny_model(), env, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replays_the_eager_rollout():
    from model.device_rollout import run_on_device

    spec = get_spec(TINY_ENV)
    model, tasks = tiny_model(max_context=12).cuda(), spec.tasks() * 4

    def run(graph, seed=2, greedy=False):
        return run_on_device(model, TorchGridEnv(spec, tasks, "cuda"), 6, greedy=greedy, seed=seed, graph=graph)["returns"]

    # greedy is deterministic: the replayed graph computes exactly the eager steps
    np.testing.assert_array_equal(run(True, greedy=True), run(False, greedy=True))
    # sampling draws from the rollout's own seeded generator inside the graph
    np.testing.assert_array_equal(run(True, seed=2), run(True, seed=2))
    assert not np.array_equal(run(True, seed=2), run(True, seed=3))


def test_device_rollout_benchmark_compares_the_loops_side_by_side(tmp_path, tiny_checkpoint):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks.device_rollout import main as bench_main

    out = tmp_path / "d.json"
    res = bench_main(["--checkpoint", str(tiny_checkpoint), "--envs", "3", "--episodes", "5", "--rounds", "2", "--out", str(out)])
    assert [(r["envs"], r["way"]) for r in res["rows"]] == [(3, "host"), (3, "device")]  # no graph on a CPU
    for r in res["rows"]:
        assert r["same_returns_as_host"] and r["vs_host_min"] <= r["vs_host"] <= r["vs_host_max"] and r["env_steps_per_s"] > 0
    assert json.loads(out.read_text())["schema"] == "ad-benchmark-device-rollout"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "device_rollout.py"
    r = subprocess.run([sys.executable, str(script), "--ways", "device"], capture_output=True, text=True)
    assert r.returncode == 2 and "--ways must include host" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_on_the_device_gives_the_batched_results(tmp_path, tiny_checkpoint, capsys):
    import json

    from conftest import refused
    from evaluate import main as eval_main

    runs = {}
    for vec in ("batched", "device"):
        eval_main(["--checkpoint", str(tiny_checkpoint), "--episodes", "6", "--num-seeds", "2", "--vec-env", vec, "--device", "cpu",
                   "--out", str(tmp_path / vec)])  # fmt: skip
        runs[vec] = json.loads((tmp_path / vec / "eval_results.json").read_text())
    assert [t["returns_per_seed"] for t in runs["device"]["per_task"]] == [t["returns_per_seed"] for t in runs["batched"]["per_task"]]
    capsys.readouterr()  # the runs' progress bars
    out = tmp_path / "refused"
    assert "kv engine only" in refused(capsys, eval_main, ["--checkpoint", str(tiny_checkpoint), "--vec-env", "device", "--engine", "rerun",
                                                           "--out", str(out)], out)  # fmt: skip
    assert "--cuda-graph needs" in refused(capsys, eval_main, ["--checkpoint", str(tiny_checkpoint), "--vec-env", "device", "--cuda-graph",
                                                               "--device", "cpu", "--out", str(out)], out)  # fmt: skip


def test_the_capturable_draw_is_torch_multinomial():
    from model.device_rollout import draw

    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for B in (1, 8, 256):
        for _ in range(50):
            probs = (torch.randn(B, 5) * 3).softmax(-1)
            torch.testing.assert_close(draw(probs, g2), torch.multinomial(probs, 1, generator=g1)[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("greedy", [True, False])
def test_a_device_step_never_reads_a_value_back_to_the_host(greedy):
    """What makes a step capturable in a CUDA graph, checked on the CPU: no operator that copies a value
    to the host or whose output shape depends on values (as .item(), bool(tensor), nonzero do)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from model.device_rollout import DeviceRollout

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    spec = get_spec({"name": "key_to_door", "size": 3, "horizon": 5, "n_holdout": 2})
    model = tiny_model(max_context=8, grid_size=3)
    ro = DeviceRollout(model, TorchGridEnv(spec, spec.tasks()[:4]), n_episodes=3, greedy=greedy)
    with torch.inference_mode(), Ops() as ops:
        for _ in range(12):  # through a slide and an episode reset
            ro.step_()
    host = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2", "equal", "allclose"}
    assert "scaled_dot_product_attention" in ops.names or "_scaled_dot_product_flash_attention_for_cpu" in ops.names
    assert not ops.names & host, ops.names & host
