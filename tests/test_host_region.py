"""The host SDK's region file: its space reserved at creation (a folder without room gives
bytes, not a SIGBUS), its lock for the client's life, and the removal of files left by
clients that died without closing (kill -9, a crash)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from guard.host import GuardClient
from guard.host._options import CounterBox
from guard.host.aio import AsyncGuardClient
from guard.host.shm import HostRegion, SharedMemory, remove_stale_regions
from tests.conftest import HOOK
from tests.test_host_client import ScriptedGuard
from tests.test_shm import ROWS_BYTES, scripted_shm_guard, x

__all__ = ["scripted_shm_guard"]  # the fixture, used by the client tests here

REPO = Path(__file__).resolve().parents[1]


def region(folder: Path, size: int = 4096) -> HostRegion:
    return HostRegion(SharedMemory(directory=str(folder), size_bytes=size), CounterBox())


def stale_file(folder: Path, name: str = "activation-guard-1-0123456789ab.shm") -> Path:
    """A region file whose client is gone: the file is there, nobody holds its lock."""
    path = folder / name
    path.write_bytes(b"\0" * 4096)
    path.chmod(0o600)
    return path


def no_space(fd: int, offset: int, length: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def not_supported(fd: int, offset: int, length: int) -> None:
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


# -- the space is reserved at creation ----------------------------------------------------------


def test_the_region_space_is_reserved_when_it_is_created(tmp_path: Path) -> None:
    size = 1024 * 1024
    host = region(tmp_path, size)
    try:
        info = os.stat(host.path)
        assert info.st_size == size
        assert info.st_blocks * 512 >= size, (
            f"expected {size} bytes reserved (not a sparse file), found "
            f"{info.st_blocks * 512}")
        assert [p.name for p in tmp_path.iterdir()] == [Path(host.path).name]  # no temp name
        assert host.enabled
    finally:
        host.close()


@pytest.mark.parametrize(("fallocate", "code"), [(no_space, errno.ENOSPC),
                                                  (not_supported, errno.EOPNOTSUPP)])
def test_a_region_that_cannot_be_reserved_is_removed_and_batches_go_as_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        fallocate: Callable[[int, int, int], None], code: int) -> None:
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    counters = CounterBox()
    with capture_logs() as logs:
        host = HostRegion(SharedMemory(directory=str(tmp_path), size_bytes=4 * 1024 * 1024),
                          counters)
    assert list(tmp_path.iterdir()) == []  # no file left behind
    assert not host.enabled and not host.needs_check
    assert host.place(x(), "F32", ROWS_BYTES) is None
    assert counters.snapshot().shm_fallbacks == 1
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(errors) == 1, f"expected one error line, found {logs}"
    line = errors[0]
    assert line["event"] == "shared-memory region not created: sending batches as bytes"
    assert (line["folder"], line["size_bytes"]) == (str(tmp_path), 4 * 1024 * 1024)
    assert line["error"] == (f"could not reserve {4 * 1024 * 1024} bytes in {tmp_path}: "
                             f"{errno.errorcode[code]}: {os.strerror(code)}")
    assert "SharedMemory(size_bytes=...)" in line["expected"]
    assert "sizeLimit" in line["expected"]
    host.close()
    host.close()  # idempotent


def test_the_client_sends_bytes_when_its_region_cannot_be_reserved(
        scripted_shm_guard: tuple[str, Path, ScriptedGuard],
        monkeypatch: pytest.MonkeyPatch) -> None:
    address, folder, plugin = scripted_shm_guard
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with GuardClient(address, hooks=[HOOK], deadline_ms=30_000,
                     shared_memory=str(folder)) as client:
        assert list(folder.iterdir()) == []
        verdicts = [client.inspect(f"req-{i}", HOOK, x(seed=i), [0, 1, 2]) for i in range(2)]
        counters = client.counters
    assert [v.source for v in verdicts] == ["guard", "guard"]
    assert [seen[0] for seen in plugin.seen] == ["req-0", "req-1"]
    assert (counters.shm_batches, counters.shm_fallbacks) == (0, 2)


def test_the_async_client_sends_bytes_when_its_region_cannot_be_reserved(
        scripted_shm_guard: tuple[str, Path, ScriptedGuard],
        monkeypatch: pytest.MonkeyPatch) -> None:
    address, folder, _plugin = scripted_shm_guard
    monkeypatch.setattr(os, "posix_fallocate", no_space)

    async def main() -> tuple[str, int, int]:
        async with AsyncGuardClient(address, hooks=[HOOK], deadline_ms=30_000,
                                    shared_memory=str(folder)) as client:
            assert list(folder.iterdir()) == []
            verdict = await client.inspect("req", HOOK, x(), [0, 1, 2])
            counters = client.counters
            return verdict.source, counters.shm_batches, counters.shm_fallbacks

    assert asyncio.run(main()) == ("guard", 0, 1)


SMALL_TMPFS_CHILD = """
import os, sys
import numpy as np
from guard.host._options import CounterBox
from guard.host.shm import HostRegion, SharedMemory
folder = sys.argv[1]
counters = CounterBox()
region = HostRegion(SharedMemory(directory=folder, size_bytes=4 * 1024 * 1024), counters)
rows = np.ones((8192, 16), dtype=np.float32)  # 512 KiB
placed = [region.place(rows, "F32", rows.nbytes) for _ in range(8)]
print(region.enabled, sum(p is not None for p in placed),
      counters.snapshot().shm_fallbacks, os.listdir(folder))
region.close()
"""


def test_a_region_larger_than_a_small_tmpfs_gives_bytes_not_sigbus(tmp_path: Path) -> None:
    """The reviewer's case: a 4 MiB region on a 1 MiB tmpfs crashed the host with SIGBUS at
    the second 512 KiB batch. Needs a tmpfs mounted in a user namespace (skipped without)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("expected the unshare command (util-linux), found none")
    folder = tmp_path / "small"
    folder.mkdir()
    script = 'mount -t tmpfs -o size=1m tmpfs "$1" || exit 77; exec "$2" -c "$3" "$1"'
    done = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
         str(folder), sys.executable, SMALL_TMPFS_CHILD],
        cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode == 77 or (done.returncode == 1 and "unshare" in done.stderr):
        pytest.skip(f"expected to mount a tmpfs in a user namespace, found: {done.stderr}")
    assert done.returncode == 0, (
        f"expected the host process to exit 0, found {done.returncode} "
        f"(-{int(signal.SIGBUS)} is SIGBUS): {done.stderr}")
    assert done.stdout.splitlines()[-1] == "False 0 8 []"


# -- the lock, and files left by dead clients ---------------------------------------------------


def test_the_region_file_is_locked_while_the_region_lives(tmp_path: Path) -> None:
    host = region(tmp_path)
    with open(host.path, "rb") as other:  # another open file: its flock conflicts
        with pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        host.close()
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the file


def test_a_new_region_removes_stale_files_and_keeps_everything_else(
        tmp_path: Path) -> None:
    live = region(tmp_path)
    stale = stale_file(tmp_path)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-outside"
    elsewhere.mkdir()
    target = stale_file(elsewhere)
    link = tmp_path / "activation-guard-2-link.shm"
    link.symlink_to(target)
    kept = [
        stale_file(tmp_path, "other.shm"),
        stale_file(tmp_path, "activation-guard-3.txt"),
        stale_file(tmp_path, ".activation-guard-4-creating.creating"),  # one being created
        stale_file(tmp_path, "xactivation-guard-5.shm"),
        link,
    ]
    directory = tmp_path / "activation-guard-6.shm"
    directory.mkdir()
    kept.append(directory)
    with capture_logs() as logs:
        new = region(tmp_path)
    try:
        assert not stale.exists()
        assert Path(live.path).exists() and live.enabled  # locked by a live region
        assert all(os.path.lexists(path) for path in kept)
        assert target.exists() and link.is_symlink()
        swept = [entry for entry in logs
                 if entry["event"].startswith("removed stale shared-memory region files")]
        assert [(e["folder"], e["removed"], e["freed_bytes"]) for e in swept] == [
            (str(tmp_path), 1, 4096)], f"expected one line naming 1 file, found {logs}"
        # the live region still works
        lease = live.place(x(), "F32", ROWS_BYTES)
        assert lease is not None
        lease.release()
    finally:
        new.close()
        live.close()
    assert not Path(live.path).exists() and not Path(new.path).exists()


def test_stale_files_of_another_owner_are_kept(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    stale = stale_file(tmp_path)
    real = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: real + 1)  # as if another user ran the sweep
    assert remove_stale_regions(str(tmp_path)) == 0
    assert stale.exists()
    monkeypatch.setattr(os, "geteuid", lambda: real)
    assert remove_stale_regions(str(tmp_path)) == 1
    assert not stale.exists()


def test_nothing_is_logged_when_no_file_is_stale(tmp_path: Path) -> None:
    with capture_logs() as logs:
        assert remove_stale_regions(str(tmp_path)) == 0
    assert logs == []


CHILD = """
import sys
from guard.host._options import CounterBox
from guard.host.shm import HostRegion, SharedMemory
region = HostRegion(SharedMemory(directory=sys.argv[1], size_bytes=4096), CounterBox())
sys.stderr.write(region.path + "\\n")
sys.stderr.flush()
sys.stdin.read()  # until killed
"""


def test_the_file_of_a_host_killed_with_sigkill_is_removed_by_the_next_region(
        tmp_path: Path) -> None:
    popen: dict[str, Any] = {"cwd": REPO, "stdin": subprocess.PIPE,
                             "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE,
                             "text": True}
    with subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], **popen) as child:
        assert child.stderr is not None
        path = Path(child.stderr.readline().strip())
        assert path.parent == tmp_path and path.exists(), (
            f"expected the child's region path, found {path!r}")
        # held by the live child: a region created now keeps it
        kept = region(tmp_path)
        assert path.exists()
        kept.close()
        child.kill()
        assert child.wait() == -signal.SIGKILL
    assert path.exists()  # nothing ran in the child to remove it
    new = region(tmp_path)
    try:
        assert not path.exists()
        assert [p.name for p in tmp_path.iterdir()] == [Path(new.path).name]
    finally:
        new.close()
    assert list(tmp_path.iterdir()) == []
