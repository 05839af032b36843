"""One rolling store of round states on disk: `round-<t>.safetensors` (tensors) with an optional
`round-<t>.json` beside it, written atomically, the oldest pruned. The coordinator keeps the
server's aggregated model after each round in one (resume after round t); each site keeps its
own network between rounds in another (its frozen groups, FedBN statistics), on its own disk.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from stagewise.io import atomic_save_tensors, atomic_write, strict_json

log = logging.getLogger("stagewise")


class RoundStore:
    def __init__(self, folder: Path, keep: int = 1):
        self.folder, self.keep = Path(folder), keep
        """`keep`: how many of the latest rounds stay (the rest are removed after each save)."""

    def rounds(self) -> list[int]:
        """Saved round numbers, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("round-*.safetensors"))

    def save(self, t: int, tensors: dict, info: dict | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(self.folder / f"round-{t}.safetensors", tensors)
        if info is not None:
            atomic_write(self.folder / f"round-{t}.json", strict_json(info))
        for old in self.rounds():
            if old <= t - self.keep:
                (self.folder / f"round-{old}.safetensors").unlink(missing_ok=True)

    def latest(self, before: int | None = None, with_info: bool = False) -> tuple[int, dict, dict | None] | None:
        """(round, tensors, info) of the latest round saved (before round `before`) that reads
        back whole (`with_info`: its json too); a round cut short by a stop is skipped for the
        one before it. None if none."""
        from safetensors.torch import load_file

        for t in reversed([t for t in self.rounds() if before is None or t < before]):
            meta = self.folder / f"round-{t}.json"
            try:
                tensors = load_file(str(self.folder / f"round-{t}.safetensors"))
                info = json.loads(meta.read_text()) if with_info or meta.is_file() else None
            except Exception as err:
                log.warning("round %s in %s is damaged (%s); using an earlier one", t, self.folder, type(err).__name__)
                continue
            return t, tensors, info
        return None
