"""Logging for people (text, progress bars on a terminal) and for jobs (`--log-format json`).

Progress is a bar only when stderr is a terminal and the format is text; otherwise it is a log
line at most every `interval` seconds, so cron and Kubernetes logs stay readable.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

from dsc import hf

_RESERVED = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(fmt: str = "text", level: str = "info") -> logging.Logger:
    """Configure the 'dsc' logger (CLI only: library users keep their own logging setup)."""
    logger = logging.getLogger("dsc")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    if fmt == "json" or not sys.stderr.isatty():
        # transformers draws its own bars (weight loading, and plain tqdm for GGUF dequantization):
        # none of them belong in a job's log. The CLI owns this process, so it may set these.
        hf.quiet_progress_bars()
        os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm only when it is first imported, so also:
        import functools

        import tqdm.std  # compressed-tensors' and GGUF's bars are plain tqdm

        if not getattr(tqdm.std.tqdm, "_dsc_quiet", False):
            # Forced, not a default: compressed-tensors passes `disable=not show_progress` itself,
            # which a partialmethod's keyword would let through (bars in the middle of JSON lines).
            original = tqdm.std.tqdm.__init__

            @functools.wraps(original)
            def quiet_init(self, *args, **kwargs):
                original(self, *args, **{**kwargs, "disable": True})

            tqdm.std.tqdm.__init__ = quiet_init
            tqdm.std.tqdm._dsc_quiet = True
    if fmt == "json":  # third-party warnings become JSON lines too
        hf.log_through(handler)
        logging.captureWarnings(True)
        logging.getLogger("py.warnings").addHandler(handler)
    return logger


def is_json(log: logging.Logger) -> bool:
    return any(isinstance(h.formatter, JsonFormatter) for h in log.handlers)


class Progress:
    """`update(done, total)` → a tqdm bar on a terminal, else throttled log lines."""

    def __init__(self, desc: str, total: int, log: logging.Logger, interval: float = 10.0):
        self.desc, self.total, self.log, self.interval = desc, total, log, interval
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty() and not is_json(log) and log.isEnabledFor(logging.INFO):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False)

    def update(self, done: int, total: int | None = None) -> None:
        self.total = total or self.total
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.n = done
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.last >= self.interval or done == self.total:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            eta = (self.total - done) / rate if rate else float("inf")
            self.log.info("%s: %d/%d (%.1f/s, eta %.0fs)", self.desc, done, self.total, rate, eta,
                          extra={"event": "progress", "task": self.desc, "done": done, "total": self.total})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
