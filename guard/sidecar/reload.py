"""Hot reload of the plugin configuration: on SIGHUP or when the config file changes.

Only the ``plugins`` section reloads (detectors, steering, sinks and their settings);
changes elsewhere (server, SAEs, logging) are reported as needing a restart and ignored. A
configuration that fails validation or plugin start-up is rejected with a logged reason and
the old one stays in force; streams are never dropped.
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
from guard.errors import GuardError

log = structlog.get_logger(__name__)


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
        try:
            return hashlib.sha256(self._path.read_bytes()).hexdigest()
        except OSError:
            return ""

    def reload(self, reason: str) -> bool:
        """Reload now; True when a new configuration is in force."""
        with self._lock:
            self._digest = self._read_digest()
            try:
                config = load_config(self._path, env=self._env)
                ignored = [name for name in ("server", "logging", "saes")
                           if getattr(config, name) != getattr(self._current, name)]
                self._engine.reload(config)
            except GuardError as exc:
                log.error("config reload rejected; the previous configuration stays in force",
                          reason=str(exc), trigger=reason, path=str(self._path))
                return False
            if ignored:
                log.warning("config changes that need a restart were ignored", sections=ignored,
                            path=str(self._path))
            self._current = replace(self._current, plugins=config.plugins)
            log.info("config reloaded", trigger=reason, path=str(self._path))
            return True

    def start(self, interval: float) -> None:
        """Poll the file every ``interval`` seconds (0: never; SIGHUP still works)."""
        if interval <= 0:
            return

        def watch() -> None:
            while not self._stop.wait(interval):
                if self._read_digest() not in ("", self._digest):
                    self.reload("file changed")

        self._thread = threading.Thread(target=watch, name="guard-config-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
