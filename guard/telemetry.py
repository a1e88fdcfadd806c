"""Logging set-up: structlog JSON lines when not on a TTY, readable lines on a TTY.

Log events never carry activations or prompt text; callers pass ids, counts and names.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from guard.config import LoggingConfig

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure_logging(config: LoggingConfig, stream: TextIO | None = None) -> None:
    """Route structlog (and the standard library's logging) to ``stream`` (stderr)."""
    out = stream if stream is not None else sys.stderr
    json_lines = config.format == "json" or (config.format == "auto" and not out.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    level = _LEVELS[config.level]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if json_lines else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=level, stream=out, format="%(levelname)s %(name)s %(message)s",
                        force=True)
