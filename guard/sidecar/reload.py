"""Hot reload of the plugin configuration: on SIGHUP or when the config file changes.

Only the ``plugins`` section reloads (detectors, steering, sinks and their settings);
changes elsewhere (server, SAEs, logging) are reported as needing a restart and ignored. A
configuration that fails to parse or validate (an empty file included), or whose plugins fail
to start, is rejected with one logged line naming the reason, and the old one stays in force;
streams are never dropped and the file watch keeps watching.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import structlog

from guard.config import GuardConfig, load_config
from guard.engine.core import Engine
from guard.errors import GuardError, bounded_repr

log = structlog.get_logger(__name__)

#: Longest reason a rejected reload logs.
MAX_REASON_CHARS = 1000


class ConfigReloader:
    """Re-reads a config file and swaps the engine's plugin pipeline when it changed."""

    def __init__(self, engine: Engine, path: Path, current: GuardConfig, *,
                 env: Mapping[str, str] | None = None) -> None:
        """``env``: what the file is read with (``guard serve``'s override flags included),
        so that a flag is not taken for a change needing a restart; None: os.environ."""
        self._engine = engine
        self._path = path
        self._env = env
        self._current = current
        self._digest = self._read_digest()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read_digest(self) -> str:
        digest = hashlib.sha256()
        try:
            with self._path.open("rb") as file:  # in chunks: a huge file is hashed, not held
                while chunk := file.read(1 << 20):
                    digest.update(chunk)
        except OSError:
            return ""
        return digest.hexdigest()

    def reload(self, reason: str) -> bool:
        """Reload now; True when a new configuration is in force."""
        with self._lock:
            self._digest = self._read_digest()
            try:
                config = load_config(self._path, env=self._env, allow_empty=False)
                ignored = [name for name in ("server", "logging", "saes")
                           if getattr(config, name) != getattr(self._current, name)]
                self._engine.reload(config)
            except Exception as exc:  # any failure is a rejected reload
                message = str(exc) if isinstance(exc, GuardError) else bounded_repr(exc)
                log.error("config reload rejected; the previous configuration stays in force",
                          reason=message[:MAX_REASON_CHARS], trigger=reason,
                          path=str(self._path))
                return False
            if ignored:
                log.warning("config changes that need a restart were ignored", sections=ignored,
                            path=str(self._path))
            self._current = replace(self._current, plugins=config.plugins)
            log.info("config reloaded", trigger=reason, path=str(self._path))
            return True

    @property
    def thread(self) -> threading.Thread | None:
        """The file watch's thread, once started (None when only SIGHUP reloads)."""
        return self._thread

    def start(self, interval: float) -> None:
        """Poll the file every ``interval`` seconds (0: never; SIGHUP still works)."""
        if interval <= 0:
            return

        def watch() -> None:
            while not self._stop.wait(interval):
                try:
                    if self._read_digest() not in ("", self._digest):
                        self.reload("file changed")
                except Exception:  # the watch outlives any one bad check
                    log.exception("config watch check failed; watching on",
                                  path=str(self._path))

        self._thread = threading.Thread(target=watch, name="guard-config-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
