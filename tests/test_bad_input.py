"""Bad input ends cleanly: every config key and flag of every script, fuzzed.

The promise: a value that was checked and refused stops the script with exit code 2 and one line
on stderr that names what to fix, before anything is written. Scripts are called in-process through
`run_cli` (a subprocess per example would cost seconds of imports); a few subprocess tests check the
exit codes themselves.
"""

from __future__ import annotations

import errno
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import analyze_attention
import collect
import compression_template
import evaluate
import evaluate_with_attention
import run_attention_analysis
import train
import training_progression
import visualize_attention
from adlens.config import COMMON_BOUNDS, run_cli
from adlens.errors import ConfigError, UserError
from conftest import refused as refused_by

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "config" / "tiny.yaml"

# script -> (module, its config dict); every key of the dict is also a flag
SCRIPTS = {
    "train": (train, train.TRAIN_CONFIG),
    "collect": (collect, collect.COLLECT_CONFIG),
    "evaluate": (evaluate, evaluate.EVAL_CONFIG),
    "evaluate_with_attention": (evaluate_with_attention, evaluate_with_attention.EVAL_CONFIG),
    "analyze_attention": (analyze_attention, analyze_attention.ANALYSIS_CONFIG),
    "visualize_attention": (visualize_attention, visualize_attention.VISUALIZE_CONFIG),
    "compression_template": (compression_template, compression_template.COMPRESSION_CONFIG),
    "run_attention_analysis": (run_attention_analysis, run_attention_analysis.PIPELINE_CONFIG),
    "training_progression": (training_progression, training_progression.PROGRESSION_CONFIG),
}
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _rules(module) -> dict:
    return {**COMMON_BOUNDS, **getattr(module, "BOUNDS", {})}


def _numeric_keys(cfg: dict):
    for key, value in cfg.items():
        item = value[0] if isinstance(value, list) and value else value
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            yield key, type(item)


def refused(capsys, name: str, argv: list[str], out: Path) -> str:
    """Script `name` refuses `argv` in-process: exit code 2, one 'error:' line, nothing written to `out`."""
    return refused_by(capsys, SCRIPTS[name][0].main, argv, out)


def test_every_numeric_key_of_every_script_is_bounded():
    """A number no one can mean is refused before work: each numeric key has (low, high) bounds."""
    missing = [f"{name}.{key}" for name, (module, cfg) in SCRIPTS.items() for key, _ in _numeric_keys(cfg) if key not in _rules(module)]
    assert not missing, f"numeric keys without bounds: {missing}"


def _bad_values(rule, kind):
    """Values outside `rule` for a key of type `kind`, as command-line text."""
    if isinstance(rule, (set, frozenset)):
        return st.text(alphabet="abcxyz_", min_size=1, max_size=8).filter(lambda v: v not in rule)
    lo, hi = rule
    options = [st.sampled_from(["nan", "inf", "-inf", "abc"])] if kind is float else [st.sampled_from(["abc", "1.5", "nan"])]
    if lo is not None:
        options.append(st.integers(max_value=math.floor(lo) - 1 if kind is int else math.floor(lo) - 1).map(str))
    if hi is not None:
        options.append(st.integers(min_value=math.floor(hi) + 1, max_value=10**15).map(str))
    return st.one_of(options)


def _cases():
    out = []
    for name, (module, cfg) in SCRIPTS.items():
        for key, rule in _rules(module).items():
            if key not in cfg or isinstance(cfg[key], bool):
                continue
            item = cfg[key][0] if isinstance(cfg[key], list) and cfg[key] else cfg[key]
            kind = type(item) if isinstance(item, (int, float)) else int if not isinstance(rule, (set, frozenset)) else str
            out.append((name, key, rule, kind))
    return out


CASES = _cases()


@SETTINGS
@given(data=st.data())
def test_out_of_range_and_non_finite_values_are_refused_naming_the_flag(data, capsys, tmp_path_factory):
    name, key, rule, kind = data.draw(st.sampled_from(CASES), label="script, key")
    value = data.draw(_bad_values(rule, kind), label="value")
    out = tmp_path_factory.mktemp("bad") / "out"
    line = refused(capsys, name, [_flag(key), value], out)
    assert _flag(key) in line or key in line, line


@pytest.mark.parametrize("name", [n for n, (_, cfg) in SCRIPTS.items() if any(k is float for _, k in _numeric_keys(cfg))])
def test_nan_and_inf_are_refused_for_every_float_key(name, capsys, tmp_path):
    module, cfg = SCRIPTS[name]
    for key, kind in _numeric_keys(cfg):
        if kind is float:
            for value in ("nan", "inf"):
                line = refused(capsys, name, [_flag(key), value], tmp_path / "out")
                assert "finite" in line and _flag(key) in line, line


YAML_SCRIPTS = {"train": "train", "collect": "collect", "analyze_attention": "analysis", "visualize_attention": "visualize"}


@SETTINGS
@given(data=st.data())
def test_yaml_values_of_the_wrong_type_are_refused_naming_key_and_file(data, capsys, tmp_path_factory):
    name = data.draw(st.sampled_from(sorted(YAML_SCRIPTS)), label="script")
    module, cfg = SCRIPTS[name]
    key = data.draw(st.sampled_from(sorted(k for k in cfg if k != "out")), label="key")
    want = cfg[key]
    wrong = {bool: ["six", 3, None], int: ["six", 1.5, None, True], float: ["six", None, False], str: [5, None, [1]], list: [{"a": 1}, None]}
    bad = data.draw(st.sampled_from(wrong[type(want)] if type(want) in wrong else ["six"]), label="value")
    folder = tmp_path_factory.mktemp("yaml")
    path = folder / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump({YAML_SCRIPTS[name]: {key: bad}}))
    line = refused(capsys, name, ["--config", str(path)], folder / "out")
    assert key in line and str(path) in line, line


@pytest.mark.parametrize("section", ["trian", "Train", "colect", "analysys"])
def test_an_unknown_section_is_an_error(section, capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"include: {TINY}\n{section}:\n  steps: 3\n")
    line = refused(capsys, "train", ["--config", str(path)], tmp_path / "out")
    assert section in line and "unknown section" in line


def test_out_that_cannot_be_written_is_refused_before_work(capsys, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for name in ("evaluate", "evaluate_with_attention", "run_attention_analysis", "compression_template", "train"):
        for out, why in ((a_file, "not a folder"), (a_file / "sub", "not a folder"), (tmp_path / ("x" * 300), "too long")):
            module, _ = SCRIPTS[name]
            with pytest.raises(SystemExit) as e:
                run_cli(module.main, ["--out", str(out)] + (["--config", str(TINY)] if name == "train" else []))
            err = capsys.readouterr().err
            assert e.value.code == 2 and why in err and err.count("\n") == 1, (name, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_out_in_a_read_only_folder_is_refused(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refused(capsys, "evaluate", [], ro / "out")
    finally:
        ro.chmod(0o700)


def test_values_that_would_need_more_memory_than_the_machine_has_are_refused(capsys, tmp_path):
    line = refused(capsys, "evaluate_with_attention", ["--eval-timesteps", "10000000", "--tasks-limit", "100000"], tmp_path / "o")
    assert "GiB" in line and "--eval-timesteps" in line
    line = refused(capsys, "collect", ["--config", str(TINY), "--timesteps", str(10**13)], tmp_path / "o")
    assert "GiB" in line and "--timesteps" in line
    line = refused(capsys, "train", ["--config", str(TINY), "--batch-size", "60000", "--context", "90000"], tmp_path / "o")
    assert "GiB" in line and "--batch-size" in line


def test_windows_longer_than_the_context_are_refused(capsys, tmp_path, make_capture):
    from adlens.capture_file import save_capture

    cap = save_capture(make_capture(T=24), tmp_path / "cap.pt")
    for key in ("--recent-window", "--sink-positions"):
        line = refused(capsys, "analyze_attention", ["--capture", str(cap), key, "25"], tmp_path / "out")
        assert key.lstrip("-").replace("-", "_") in line and "context (24)" in line
    line = refused(capsys, "compression_template", ["--keep-recent", "500", "--threads", "1"], tmp_path / "out")
    assert "keep_recent" in line


def test_a_config_error_is_both_a_value_error_and_a_user_error():
    from adlens.compression import make_compression

    with pytest.raises(ValueError):
        make_compression("fixed_window", context=10, ratio=2.0)
    with pytest.raises(UserError):
        make_compression("fixed_window", context=10, ratio=2.0)
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, UserError)


def test_a_bug_keeps_its_traceback_and_debug_shows_user_errors(capsys):
    def buggy(argv):
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        run_cli(buggy, [])

    def refuses(argv):
        assert "--debug" not in argv  # run_cli takes the flag out
        raise UserError("fix this")

    with pytest.raises(UserError):
        run_cli(refuses, ["--debug"])
    with pytest.raises(SystemExit) as e:
        run_cli(refuses, [])
    assert e.value.code == 2 and capsys.readouterr().err == "error: fix this\n"


def test_a_full_disk_during_the_run_is_one_line_and_exit_1(capsys):
    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/capture.pt")

    with pytest.raises(SystemExit) as e:
        run_cli(full, [])
    assert e.value.code == 1 and capsys.readouterr().err == "error: No space left on device: runs/x/capture.pt\n"


def _tiny_run(tmp_path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    collect.main(["--config", str(TINY), "--out", str(data), "--first-tasks", "9"])
    out = tmp_path / "run"
    train.main(["--config", str(TINY), "--data", str(data), "--out", str(out), "--steps", "2"])
    return data, out


def test_resume_refuses_contradicting_flags_and_records_allowed_changes(capsys, tmp_path):
    import json

    data, out = _tiny_run(tmp_path)
    base = ["--config", str(TINY), "--data", str(data), "--resume"]
    for flag, value in (("--lr", "0.5"), ("--d-model", "32"), ("--seed", "7"), ("--batch-size", "2")):
        with pytest.raises(SystemExit) as e:
            run_cli(train.main, base + [flag, value, "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "contradict" in err and flag.lstrip("-").replace("-", "_") in err, err
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, ["--config", str(TINY), "--data", str(data), "--resume", "--out", str(tmp_path / "new")])
    assert e.value.code == 2 and "nothing to resume" in capsys.readouterr().err
    # no flags: the saved settings, not the script's defaults; --steps may grow and is recorded
    train.main(["--resume", "--out", str(out), "--steps", "4", "--data", str(data)])
    meta = json.loads((out / "train_config.json").read_text())
    assert meta["train"]["steps"] == 4 and meta["train"]["resume_changes"] == [{"steps": 4}]
    assert meta["model"]["d_model"] == 16  # tiny's, from the saved run
    assert torch.load(out / "model.pt", weights_only=True)["step"] == 4


def test_collect_refuses_to_mix_histories_of_other_settings(capsys, tmp_path):
    out = tmp_path / "d"
    collect.main(["--config", str(TINY), "--out", str(out), "--first-tasks", "1"])
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SystemExit) as e:
        run_cli(collect.main, ["--config", str(TINY), "--out", str(out), "--first-tasks", "2", "--learning-rate", "0.01"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "learning_rate" in err and "new --out" in err
    assert sorted(p.name for p in out.iterdir()) == before


_REAL = [  # (argv, what the one line names): real processes, all started at once (the rest: in-process above)
    (["train.py", "--config", str(TINY), "--lr", "inf"], "--lr"),
    (["analyze_attention.py", "--dpi", "100000"], "--dpi"),
    (["compression_template.py", "--threads", "100000"], "--threads"),
]


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *argv, "--out", str(tmp / f"out{i}")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i, (argv, _) in enumerate(_REAL)]  # fmt: skip
    try:
        return [(p.communicate(timeout=120)[1], p.returncode, tmp / f"out{i}") for i, p in enumerate(procs)]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None


@pytest.mark.parametrize("i", range(len(_REAL)), ids=[needle for _, needle in _REAL])
def test_exit_code_2_and_one_line_from_a_real_process(real_runs, i):
    stderr, rc, out = real_runs[i]
    assert rc == 2 and stderr.count("\n") == 1 and _REAL[i][1] in stderr and "Traceback" not in stderr, stderr
    assert not out.exists()


def test_more_local_workers_than_4x_the_cores_are_refused(capsys, tmp_path):
    many = str(4 * (os.cpu_count() or 1) + 1)
    for name, extra in (("collect", ["--config", str(TINY)]), ("evaluate", []), ("compression_template", []), ("training_progression", [])):
        line = refused(capsys, name, [*extra, "--workers", many], tmp_path / "out")
        assert f"--workers {many}" in line and "cores" in line, line
