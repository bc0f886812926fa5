"""What the tools print: known third-party warnings filtered once, progress bars only on a terminal."""
from __future__ import annotations

import contextlib
import errno
import logging
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


def progress(iterable=None, *, main: bool = True, **kwargs) -> tqdm.tqdm:
    """A tqdm bar on rank 0 when stderr is a terminal; off otherwise, so a redirected log
    (``> train.log 2>&1``) holds the logger's lines, not carriage-return bar updates."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm.tqdm(iterable, disable=not (main and sys.stderr.isatty()), **kwargs)


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
