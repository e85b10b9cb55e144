"""Safe writing (adlens.io): unique short temporary names, stale-temporary cleanup, the folder lock,
the output manifest, and the rank logic of the error report under torchrun."""

from __future__ import annotations

import json
import os
import threading

import pytest

from adlens import config as C
from adlens.errors import UserError
from adlens.io import (
    MANIFEST_NAME,
    OutputManifest,
    atomic_path,
    lock_folder,
    remove_stale_temps,
    staged_output,
    write_json_atomic,
)


def test_concurrent_writers_of_one_file_never_share_a_temporary(tmp_path):
    """Two writers inside their `atomic_path` at the same time: each has its own temporary file,
    both renames succeed, and the file holds one of the two complete contents."""
    target = tmp_path / "model.pt"
    both_open = threading.Barrier(2)
    temps, errors = [], []

    def write(text: str):
        try:
            with atomic_path(target) as tmp:
                temps.append(tmp)
                tmp.write_text(text)
                both_open.wait(timeout=10)  # the other writer has its temporary file too
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t * 1000,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(temps)) == 2
    assert target.read_text() in ("a" * 1000, "b" * 1000)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_a_failed_write_leaves_neither_temporary_nor_output(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []


def test_temporary_names_stay_short_and_written_files_get_the_usual_permissions(tmp_path):
    name = "n" * 250 + ".json"  # a valid name: 255 bytes
    with atomic_path(tmp_path / name) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and len(tmp.name) < 60
        tmp.write_text("{}")
    with staged_output(tmp_path / ("d" * 255)) as stage:  # the staging folder's name is short too
        assert len(stage.name) < 60
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_remove_stale_temps_removes_only_the_named_outputs_leftovers(tmp_path):
    (tmp_path / ".model.pt.ab12cd_9.tmp").write_text("")  # left by a killed save of model.pt
    (tmp_path / ".step_000010.pt.zzzzzzzz.tmp").write_text("")
    keep = [".other.pt.ab12cd_9.tmp", "model.pt", ".model.pt.tmp", "notes.tmp"]
    for k in keep:
        (tmp_path / k).write_text("")
    removed = remove_stale_temps(tmp_path, ["model.pt", "step_*.pt"])
    assert sorted(p.name for p in removed) == [".model.pt.ab12cd_9.tmp", ".step_000010.pt.zzzzzzzz.tmp"]
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_a_second_writer_of_a_locked_folder_is_refused(tmp_path):
    with lock_folder(tmp_path / "out", "train.py run"):
        with pytest.raises(UserError, match="another train.py run is writing"):
            with lock_folder(tmp_path / "out", "train.py run"):
                pass
    with lock_folder(tmp_path / "out", "train.py run"):  # released on exit
        pass


def test_manifest_removes_exactly_the_previous_runs_files(tmp_path):
    out = tmp_path / "out"
    first = OutputManifest(out, "test")
    assert first.start() == []
    with staged_output(out, first) as stage:
        for name in ("a.png", "b.json", "heat_7.png"):
            (stage / name).write_text(name)
    first.finish()
    doc = json.loads((out / MANIFEST_NAME).read_text())
    assert (doc["schema"], doc["schema_version"]) == ("adlens-output-manifest", 1) and doc["status"] == "complete"
    assert doc["files"] == ["a.png", "b.json", "heat_7.png"]
    (out / "foreign.txt").write_text("mine")
    second = OutputManifest(out, "test")
    assert second.start() == ["a.png", "b.json", "heat_7.png"]
    assert sorted(os.listdir(out)) == ["foreign.txt", MANIFEST_NAME]
    assert json.loads((out / MANIFEST_NAME).read_text())["status"] == "running"


def test_files_are_listed_before_they_are_published(tmp_path):
    """A run killed while its staged files move in has them all in its manifest already."""
    out = tmp_path / "out"
    m = OutputManifest(out, "test")
    m.start()
    with pytest.raises(KeyboardInterrupt), staged_output(out, m) as stage:
        (stage / "x.png").write_text("")
        real_add = m.add

        def add_then_die(names):
            real_add(names)
            raise KeyboardInterrupt

        m.add = add_then_die
    assert json.loads((out / MANIFEST_NAME).read_text())["files"] == ["x.png"]


def test_a_manifest_never_reaches_outside_its_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "precious.txt").write_text("keep")
    (out / "sub").mkdir()
    names = ["../precious.txt", str(tmp_path / "precious.txt"), "sub", "..", MANIFEST_NAME, 3, None]
    (out / MANIFEST_NAME).write_text(json.dumps({"schema": "adlens-output-manifest", "version": 1, "files": names}))
    assert OutputManifest(out, "test").start() == []
    assert (tmp_path / "precious.txt").is_file() and (out / "sub").is_dir()
    (out / MANIFEST_NAME).write_text(json.dumps({"files": ["x"]}))  # someone else's manifest.json
    with pytest.raises(UserError, match="not this toolkit's output manifest"):
        OutputManifest(out, "test").start()


# ---- torchrun: one error line, from rank 0 -------------------------------------------------------
def _refuse(argv=None):
    raise UserError("--steps must be >= 1, got 0")


def test_rank_0_reports_at_once(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(C.time, "sleep", lambda s: pytest.fail("rank 0 must not wait"))
    with pytest.raises(SystemExit) as e:
        C.run_cli(_refuse)
    assert e.value.code == 2 and capsys.readouterr().err == "error: --steps must be >= 1, got 0\n"


def test_other_ranks_wait_silently_for_rank_0(monkeypatch, capsys):
    """Another rank leaves rank 0 the report: while it waits (when the launcher stops it) it has printed nothing."""

    class Stopped(BaseException):
        pass

    def stopped_by_launcher(seconds):
        assert seconds == C.LEAD_GRACE_S
        raise Stopped

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(C.time, "sleep", stopped_by_launcher)
    with pytest.raises(Stopped):
        C.run_cli(_refuse)
    with pytest.raises(Stopped):
        C.run_cli(lambda argv: C.make_parser("train.py").parse_args(["--no-such-flag"]))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(C.time, "sleep", lambda s: None)  # still running after the wait: its own error, said so
    with pytest.raises(SystemExit) as e:
        C.run_cli(_refuse)
    assert e.value.code == 2 and capsys.readouterr().err == "error: (rank 1) --steps must be >= 1, got 0\n"
