"""The cohort's error type and file identity, shared by the manifest loader and the image
checks (kept apart so that neither imports the other)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable
from stagewise.errors import StagewiseError

_MAX_SHOWN = 50
MANIFEST_HINT = (
    "Fix these in the manifest (row numbers are line numbers in the CSV file, the header "
    "being line 1) or in the recipe's cohort section, then run again."
)


class CohortError(StagewiseError, ValueError):
    """All problems with a cohort at once; `problems` holds one line per problem."""

    def __init__(self, problems: Iterable[str], manifest: str | Path | None = None, hint: str = MANIFEST_HINT):
        self.problems = list(problems)
        self.manifest = None if manifest is None else str(manifest)
        self.hint = hint
        super().__init__(self._message())

    def __reduce__(self):
        # Default pickling would call CohortError(message): keep the fields across processes.
        return (type(self), (self.problems, self.manifest, self.hint))

    def _message(self) -> str:
        n = len(self.problems)
        where = f"{self.manifest}: " if self.manifest else ""
        lines = [f"{where}{n} problem{'' if n == 1 else 's'} in the cohort:"]
        lines += [f"  - {p}" for p in self.problems[:_MAX_SHOWN]]
        if n > _MAX_SHOWN:
            lines.append(f"  ... and {n - _MAX_SHOWN} more")
        lines.append(self.hint)
        return "\n".join(lines)


def file_key(path: str) -> tuple:
    """Identity of a file: device and inode (symbolic and hard links agree), else the real path."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", path)
    return ("file", st.st_dev, st.st_ino) if st.st_ino else ("path", os.path.realpath(path))
