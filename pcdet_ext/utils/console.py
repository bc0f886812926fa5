"""What the tools print: known third-party warnings filtered once, progress as a bar on a terminal and as
log lines elsewhere, a full disk as one line."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import warnings
from typing import Iterator

import tqdm

# (category, start of the message): warnings every OpenPCDet run on this stack prints, none actionable
KNOWN_WARNINGS = (
    (FutureWarning, r"`torch\.cuda\.amp\.\w+\(args\.\.\.\)` is deprecated"),            # OpenPCDet's AMP calls
    (UserWarning, r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing"),
    (UserWarning, r"This DataLoader will create \d+ worker processes in total"),       # workers > cores (CPU)
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
    (UserWarning, r"Using a non-tuple sequence for multidimensional indexing is deprecated"),  # spconv
)


def message(exc: BaseException) -> str:
    """An exception's text for a one-line error (a KeyError's ``str`` wraps it in quotes)."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def quiet_known_warnings() -> None:
    """Filter :data:`KNOWN_WARNINGS`, numba's performance warnings and torch.fx's ``is_fx_tracing``
    deprecation log line (spconv calls it on every sparse forward) (idempotent; others still show)."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    try:
        from numba.core.errors import NumbaPerformanceWarning
    except ImportError:
        return
    warnings.filterwarnings("ignore", category=NumbaPerformanceWarning)


PROGRESS_SECONDS = "PCDET_EXT_PROGRESS_SECONDS"  # how often a redirected log gets a progress line (default 30)


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines on ``stream``."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for part in text.replace("\r", "\n").split("\n"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, *, main: bool = True, **kwargs) -> tqdm.tqdm:
    """Progress on rank 0: a tqdm bar when stderr is a terminal; when it is not (``| tee``, a log file, a
    batch job) one line at the start, every ``PCDET_EXT_PROGRESS_SECONDS`` (30) seconds and at the end
    (iterations, rate, ETA and the loop's postfix, e.g. the loss), so a long step shows it is alive."""
    if not main:
        return tqdm.tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm.tqdm(iterable, **kwargs)
    every = float(os.environ.get(PROGRESS_SECONDS, "30"))
    return tqdm.tqdm(iterable, file=_Lines(sys.stderr), mininterval=every, maxinterval=max(every, 1.0), ascii=True,
                     ncols=100, **kwargs)


class DiskFull(Exception):
    """Raised by :func:`disk_full_is_one_line` after printing its line (the tool returns 2)."""


@contextlib.contextmanager
def disk_full_is_one_line() -> Iterator[None]:
    """A full disk (or quota) while the block saves is one line naming the file, then :class:`DiskFull`;
    every save is atomic, so the last saved state stays and the same command continues from it."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {exc.strerror} writing {exc.filename}; free space there and run the same command again to "
              f"continue from the last saved state", file=sys.stderr)
        raise DiskFull() from None
