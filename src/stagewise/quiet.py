"""Library noise: warnings of the libraries stagewise drives that tell its user nothing they
can act on. They go to the `stagewise.library` logger, which reaches a run's log.txt (the
run's handler sits on the `stagewise` logger) and never the screen: a developer reading
log.txt still sees them, a user watching the progress lines does not.

- Flower log messages about settings stagewise itself chose (`FLOWER_NOISE`, e.g. federated
  evaluation skipped: stagewise scores the sites itself);
- Python warnings of the kinds meant for the library's developers (deprecations, Ray's
  FutureWarnings) raised outside stagewise's own code, and numpy's RuntimeWarnings (an
  empty slice, a division by zero in a metric of a small fold).

A warning stagewise raises itself, or a library's UserWarning about the user's input, is
shown as before.
"""

from __future__ import annotations

import logging
from pathlib import Path

library_log = logging.getLogger("stagewise.library")
library_log.addHandler(logging.NullHandler())  # without a run's log.txt: nowhere (not logging's last resort)

FLOWER_NOISE = (
    "fraction_evaluate is set to 0.0",  # stagewise asks its sites for their scores itself
)
"""Beginnings of Flower log messages that only restate a setting stagewise made on purpose."""

DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
"""Warnings addressed to whoever calls the library (stagewise), not to stagewise's user."""

_PACKAGE = Path(__file__).resolve().parent


class _FlowerNoise(logging.Filter):
    """On Flower's logger: a record in `FLOWER_NOISE` goes to log.txt instead of Flower's console."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno >= logging.WARNING and message.startswith(FLOWER_NOISE):
            library_log.warning("flwr: %s", message)
            return False
        return True


def flower_noise_to_log() -> None:
    """Route Flower's noise (`FLOWER_NOISE`) to log.txt from now on; called before stagewise
    makes a Flower object that would log it. Idempotent."""
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, _FlowerNoise) for f in flower.filters):
        flower.addFilter(_FlowerNoise())


def is_library_noise(category: type[Warning], filename: str) -> bool:
    """Whether a Python warning is kept out of sight: numpy's RuntimeWarnings, and developer
    warnings raised in a file outside stagewise's package."""
    if issubclass(category, RuntimeWarning):
        return True
    try:
        ours = Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        ours = False
    return issubclass(category, DEVELOPER_WARNINGS) and not ours


def warnings_to_log(show):
    """A `warnings.showwarning` that writes library noise (`is_library_noise`) to log.txt and
    hands every other warning to `show` (the screen)."""
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if is_library_noise(category, filename):
            library_log.warning("%s: %s (%s:%d)", category.__name__, message, Path(filename).name, lineno)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning
