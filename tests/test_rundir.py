"""Run folders and atomic writes: nothing of the user's is deleted, nothing half-written stays.

References are independent of the code under test: hashlib for the manifest's checksums,
the file system's own listing for leftovers, real subprocesses killed with real signals.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _reliability import ROOT, check_contract, check_run_folder, invoke, make_tiny, temporaries

from fairdeploy._io import atomic_write_text
from fairdeploy._stale import is_owned_temporary, make_owned_dir, remove_stale
from fairdeploy.errors import FairDeployError
from fairdeploy.rundir import check_out, staging_dir


def _run(folder: Path, files: dict[str, str]) -> None:
    with staging_dir(folder) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def test_manifest_lists_every_file_with_its_sha256(tmp_path: Path) -> None:
    _run(tmp_path / "run", {"report.json": '{"schema_version": 1}', "report.md": "# r\n"})
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"report.json", "report.md"}
    for name, rec in manifest["files"].items():
        data = (tmp_path / "run" / name).read_bytes()
        assert rec == {**rec, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_earlier_run_is_replaced_only_when_it_holds_just_its_own_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run, {"report.json": "1", "model.onnx": "a"})
    _run(run, {"report.json": "2"})  # untouched earlier run: replaced whole
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "report.json"]
    assert (run / "report.json").read_text() == "2"

    (run / "thesis.tex").write_text("years of work")  # a file of the user's
    with pytest.raises(FairDeployError, match=r"thesis\.tex"):
        check_out(run)
    with pytest.raises(FairDeployError, match=r"thesis\.tex"):
        _run(run, {"report.json": "3"})
    assert (run / "thesis.tex").read_text() == "years of work"
    assert (run / "report.json").read_text() == "2"
    (run / "thesis.tex").unlink()

    (run / "report.json").write_text("edited by hand")  # a run file changed since
    with pytest.raises(FairDeployError, match="changed after the run wrote it"):
        check_out(run)
    (run / "report.json").write_text("2")
    os.utime(run / "report.json", ns=(1, 1))  # same bytes, other time: the hash decides
    check_out(run)

    (run / "sub").mkdir()
    with pytest.raises(FairDeployError, match="a folder"):
        check_out(run)
    (run / "sub").rmdir()

    (run / "manifest.json").write_text("{not json")
    with pytest.raises(FairDeployError, match="not a fairdeploy run folder"):
        check_out(run)
    assert not temporaries(tmp_path)


def test_a_report_json_alone_does_not_make_a_folder_replaceable(tmp_path: Path) -> None:
    """Issue 11's data loss: a folder with a report.json and the user's files."""
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "report.json").write_text("{}")
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FairDeployError, match="not a fairdeploy run folder"):
        _run(mine, {"report.json": "new"})
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "report.json"]
    assert (mine / "report.json").read_text() == "{}"


def test_a_file_added_during_the_run_stops_the_swap(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run, {"report.json": "1"})
    with pytest.raises(FairDeployError, match=r"late\.txt"), staging_dir(run) as tmp:
        (tmp / "report.json").write_text("2")
        (run / "late.txt").write_text("written while the run worked")
    assert (run / "late.txt").exists() and (run / "report.json").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failed_run_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), staging_dir(tmp_path / "run") as tmp:
        (tmp / "model.onnx").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_optimize_out_keeps_a_users_files_next_to_a_report_json(tmp_path: Path) -> None:
    tiny = make_tiny(tmp_path / "p")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text("{}")
    (mine / "analysis.ipynb").write_text("my notebook")
    out = invoke("optimize", tiny.ckpt, "--recipe", tiny.recipe, "--out", mine,
                 "--exports", tmp_path / "exp", "--no-latency")
    assert check_contract(out) == "error" and "not a fairdeploy run folder" in out.text
    assert (mine / "analysis.ipynb").read_text() == "my notebook"
    # A real run folder is replaced by the next run and stays valid.
    args = ("optimize", tiny.ckpt, "--recipe", tiny.recipe, "--out", tmp_path / "run",
            "--exports", tmp_path / "exp", "--no-latency")
    assert check_contract(invoke(*args)) == "ok"
    first = check_run_folder(tmp_path / "run")
    assert check_contract(invoke(*args)) == "ok"
    assert check_run_folder(tmp_path / "run")["methods"] == first["methods"]
    assert not temporaries(tmp_path)


# --------------------------------------------------------------- dead processes, signals

_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fairdeploy.rundir import staging_dir
    from fairdeploy._io import atomic_path
    where, what = Path(sys.argv[1]), sys.argv[2]
    if what == "staging":
        with staging_dir(where / "run") as tmp:
            (tmp / "model.onnx").write_text("half")
            print("ready", flush=True)
            time.sleep(300)
    else:
        with atomic_path(where / "cache.pt") as tmp:
            tmp.write_text("half")
            print("ready", flush=True)
            time.sleep(300)
    """
)


def _child(where: Path, what: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(where), what], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("what", ["staging", "atomic"])
def test_sigterm_cleans_up_and_ends_the_process_by_sigterm(tmp_path: Path, what: str) -> None:
    proc = _child(tmp_path, what)
    assert temporaries(tmp_path)  # the half-written file exists while it runs
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == -signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("what", ["staging", "atomic"])
def test_sigkill_leftovers_are_removed_by_the_next_write(tmp_path: Path, what: str) -> None:
    alive = _child(tmp_path, what)  # a live owner: its temporaries must stay
    killed = _child(tmp_path, what)
    killed.kill()
    killed.wait(timeout=30)
    left = temporaries(tmp_path)
    assert len(left) == 2
    (tmp_path / ".run.backup").mkdir()  # the user's own dot-folder never matches
    if what == "staging":
        _run(tmp_path / "other", {"report.json": "1"})
    else:
        atomic_write_text(tmp_path / "x.txt", "x")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len([n for n in names if is_owned_temporary(n)]) == 1  # only the live owner's
    assert ".run.backup" in names
    alive.kill()
    alive.wait(timeout=30)
    assert len(remove_stale(tmp_path)) == 1
    assert not temporaries(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="start times come from /proc")
def test_a_reused_process_id_does_not_protect_a_dead_owners_temporary(tmp_path: Path) -> None:
    """Same pid, another start time: the temporary belongs to an earlier process."""
    mine = make_owned_dir(tmp_path, "run")
    parts = mine.name.split("-")
    parts[3] = str(int(parts[3]) + 1)  # the start time of a former holder of our pid
    ghost = tmp_path / "-".join(parts)
    mine.rename(ghost)
    live = make_owned_dir(tmp_path, "run")
    assert remove_stale(tmp_path) == [ghost]
    assert live.exists()


def test_files_written_from_two_threads_keep_the_umask(tmp_path: Path) -> None:
    """compare writes from two threads; reading the umask must never leave it changed
    (the set-and-restore way can leave 0 behind when two threads interleave)."""
    import threading

    from fairdeploy._io import current_umask

    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027

        def write(tag: str) -> None:
            for i in range(200):
                atomic_write_text(tmp_path / f"{tag}{i}.txt", "x")

        threads = [threading.Thread(target=write, args=(t,)) for t in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert current_umask() == 0o027 and os.umask(0o027) == 0o027
        modes = {(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
        assert modes == {0o640}
    finally:
        os.umask(old)


def test_a_dangling_symlink_out_is_refused_before_any_work(tmp_path: Path) -> None:
    """Issue 21 item 13: it failed only after the whole run."""
    link = tmp_path / "run"
    os.symlink(tmp_path / "nowhere", link)
    with pytest.raises(FairDeployError, match=r"is a symlink to .*nowhere.*which does not exist"):
        check_out(link)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()
