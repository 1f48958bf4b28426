"""tdm.io: atomic files and folders, crash recovery of a folder swap, manifests, the root lock."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tdm import io


def test_atomic_file_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "out.txt"
    io.write_text(path, "old")
    with pytest.raises(RuntimeError), io.atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temp file left


def test_write_json_converts_numpy_and_paths(tmp_path):
    import json

    import numpy as np

    io.write_json(tmp_path / "a.json", {"x": np.int64(3), "y": np.arange(2), "p": Path("q")})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 3, "y": [0, 1], "p": "q"}


def _folder(path: Path, text: str) -> None:
    path.mkdir()
    (path / "f.txt").write_text(text)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_dir_replaces_on_success_and_rolls_back_on_failure(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    final = tmp_path / "model"
    with io.atomic_dir(final) as tmp:
        (tmp / "f.txt").write_text("one")
    with io.atomic_dir(final) as tmp:
        (tmp / "f.txt").write_text("two")
    assert (final / "f.txt").read_text() == "two"
    with pytest.raises(RuntimeError), io.atomic_dir(final) as tmp:
        (tmp / "f.txt").write_text("three")
        raise RuntimeError("stage failed")
    assert (final / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failure_between_the_two_renames_rolls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    final = tmp_path / "round_0"
    _folder(final, "trained")
    new = tmp_path / "new"
    _folder(new, "newer")
    real_rename = os.rename
    calls = []

    def fail_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_rename(src, dst)

    monkeypatch.setattr(io.os, "rename", fail_second)
    with pytest.raises(OSError, match="disk full"):
        io.swap_dir(new, final)
    assert (final / "f.txt").read_text() == "trained"


def test_a_crash_between_the_two_renames_is_recovered(tmp_path):
    """The state a kill between the renames leaves: no folder, the old one aside, the new one
    still under its temporary name. Recovery puts the old folder back."""
    final = tmp_path / "round_0"
    _folder(tmp_path / ".round_0.ab12.old", "trained")
    _folder(tmp_path / ".round_0.cd34.tmp", "newer")
    io.recover_dir(final)
    assert (final / "f.txt").read_text() == "trained"
    assert not list(tmp_path.glob(".round_0.*.old"))


def test_swap_finishes_a_crashed_swap_first(tmp_path):
    final = tmp_path / "round_0"
    _folder(tmp_path / ".round_0.x1.old", "stranded")
    new = tmp_path / "new"
    _folder(new, "new")
    io.swap_dir(new, final)
    assert (final / "f.txt").read_text() == "new"
    assert not list(tmp_path.glob(".round_0.*"))


def test_manifest_finds_a_flipped_byte_a_missing_and_an_extra_file(tmp_path):
    folder = tmp_path / "m"
    with io.atomic_dir(folder, manifest=True) as tmp:
        (tmp / "a.bin").write_bytes(bytes(range(256)))
        (tmp / "b.txt").write_text("b")
    io.verify_manifest(folder)
    data = bytearray((folder / "a.bin").read_bytes())
    data[100] ^= 1
    (folder / "a.bin").write_bytes(bytes(data))
    with pytest.raises(io.IntegrityError, match="a.bin: sha256 differs"):
        io.verify_manifest(folder)
    data[100] ^= 1
    (folder / "a.bin").write_bytes(bytes(data))
    (folder / "c.txt").write_text("c")
    with pytest.raises(io.IntegrityError, match="c.txt: not listed"):
        io.verify_manifest(folder)
    (folder / "c.txt").unlink()
    (folder / "b.txt").unlink()
    with pytest.raises(io.IntegrityError, match="b.txt: missing"):
        io.verify_manifest(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(io.IntegrityError, match="manifest.json: missing"):
        io.verify_manifest(folder)
    assert io.verify_manifest(folder, required=False) is None


HOLD = """
import sys, time
from tdm.io import root_lock
with root_lock(sys.argv[1], "tdm pipeline"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_holder_fails_at_once_naming_the_first_and_kill_9_releases(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        with pytest.raises(io.LockedError, match=rf"in use by pid {holder.pid} .*tdm pipeline"):
            with io.root_lock(tmp_path, "tdm train"):
                pass
        assert time.perf_counter() - t0 < 1.0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with io.root_lock(tmp_path, "tdm train"):  # the kernel released the dead holder's lock
        pass
