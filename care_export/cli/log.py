"""What the command line shows: log lines on stderr (``-v``/``-q``), an optional log file, the
results on stdout, and the "next:" hint.

The library logs with :mod:`logging` (loggers ``care_export.*``, ``runtime.*``,
``calibration.*``); this module attaches the handlers for one command and removes them after it.
The console handler writes through ``tqdm.write`` once tqdm is loaded (what
``tqdm.contrib.logging`` does), so log lines and progress bars do not overwrite each other;
progress bars themselves are drawn only on a terminal. The log file never receives bar frames:
it holds every record (debug included), the results printed on stdout and the error line.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import click

OURS = ("care_export", "runtime", "calibration")
log = logging.getLogger("care_export.cli")


class _Console(logging.Handler):
    """Log records on the current ``sys.stderr`` (resolved per record: test runners swap it)."""

    def emit(self, record):
        try:
            msg = self.format(record)
            tqdm = sys.modules.get("tqdm")
            if tqdm is not None:
                tqdm.tqdm.write(msg, file=sys.stderr)
            else:
                sys.stderr.write(msg + "\n")
                sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


class _ConsoleFormat(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


def _not_for_console(record) -> bool:
    return not getattr(record, "file_only", False)


@contextmanager
def command_logging(verbose: int = 0, quiet: bool = False, log_file: Path | None = None):
    """Handlers for one command: stderr at INFO (``-v`` DEBUG, ``-q`` WARNING), ``log_file`` at
    DEBUG. Python warnings become log records. Everything is restored afterwards."""
    console = _Console(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    console.setFormatter(_ConsoleFormat())
    console.addFilter(_not_for_console)
    handlers = [console]
    if log_file is not None:
        try:
            file = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise click.BadParameter(
                f"cannot write {log_file}: {exc.strerror or exc}", param_hint="--log-file"
            ) from None
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        handlers.append(file)
    root = logging.getLogger()
    saved = [(name, logging.getLogger(name).level) for name in OURS + ("py.warnings",)]
    for h in handlers:
        root.addHandler(h)
    for name in OURS:  # ours at DEBUG (the handlers filter); third-party loggers keep root's WARNING
        logging.getLogger(name).setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for h in handlers:
            root.removeHandler(h)
            h.close()
        for name, level in saved:
            logging.getLogger(name).setLevel(level)


def say(text: str = "") -> None:
    """A result line on stdout, copied into the log file."""
    click.echo(text)
    log.info(text, extra={"file_only": True})


def error(text: str) -> None:
    """The one-line ``error: ...`` on stderr (shown even with ``-q``), copied into the log file."""
    click.echo(f"error: {text}", err=True)
    log.error(text, extra={"file_only": True})


def hint(text: str) -> None:
    """``next: <command>``, the usual next step, on stderr (hidden by ``-q``; not given with --json)."""
    log.info(f"next: {text}")


def mib(n: int) -> str:
    """``n`` bytes in MiB, as every command prints sizes."""
    return f"{n / 2**20:.1f} MiB"


def disk_bytes(directory: Path) -> int:
    """What the files of ``directory`` take on disk (sparse and preallocated files as they are)."""
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir() if p.is_file())
