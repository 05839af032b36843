"""Decode every image of a cohort before any training, and report all bad files at once.

A manifest can be perfect while its files are not: zero-byte or truncated downloads, a
text file renamed `.png`, a DICOM report without pixels, a 1x1 placeholder, a blank
export, 12-bit data stored unscaled in a 16-bit PNG (nearly black), or one image filed
under two patients (a classic leak in public chest X-ray sets: the copy lands in the
training part while the original is tested). `check_images` decodes each file with the
same reader training uses, in a bounded thread pool, and collects:

problems (raised together in one CohortError, each naming the CSV row and the file):
  - files that cannot be read (`read_image` raises ImageReadError);
  - images smaller than MIN_SIDE pixels on a side, and constant images (no contrast);
  - identical decoded pixels under different patients;
  - a 3D volume among 2D images, or the reverse;
warnings (returned, one line each, listing all the rows concerned):
  - images whose brightest pixel is below LOW_RANGE of the format's range;
  - identical decoded pixels twice for the same patient (no leak, but counted twice).
"""

from __future__ import annotations

import os
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from stagewise.data.image_digest import content_digest
from stagewise.data.problems import CohortError, file_key
from stagewise.data.readers import NOT_A_FILE, ImageReadError, is_volume_path, png_significant_bits, read_image

MIN_SIDE = 8
"""Images smaller than this on any side are reported: resized to the input size they
carry (almost) no structure, and train as a constant."""
LOW_RANGE = 1 / 16
"""Images whose brightest pixel stays below this fraction of the format's range (after
scaling by bit depth) are warned about: 12-bit data in a 16-bit file reaches 1/16."""
_PROGRESS_OVER = 200
_SHOWN_ROWS = 20
_IMAGE_HINT = "Fix or replace these image files, or remove their rows from the manifest."

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class _Probe:
    """What the checks need to know of one decoded image (the pixels are not kept)."""

    shape: tuple[int, ...] = ()
    lo: float = 0.0
    hi: float = 0.0
    digest: bytes = b""
    error: str | None = None


def _probe(path: str) -> _Probe:
    try:
        img = read_image(path)
    except ImageReadError as err:  # a path from the manifest: the hint names where to look
        hint = "; check the image path in the manifest" if err.reason in NOT_A_FILE else ""
        return _Probe(error=err.reason + hint)
    except Exception as err:  # a reader bug must not hide the other files' problems
        return _Probe(error=f"the file cannot be decoded ({type(err).__name__}: {err})")
    return _Probe(tuple(img.shape), float(img.min()), float(img.max()), content_digest(img))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int | None = None) -> Iterator[R]:
    """fn over items in a thread pool, results in input order, at most `window` in flight."""
    window = window or 4 * workers
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _row_list(rows: list[int]) -> str:
    return f"row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}"


def inspect_images(
    paths: Sequence[str | Path],
    rows: Sequence[int],
    names: Sequence[str] | None = None,
    patients: Sequence[object] | None = None,
    workers: int | None = None,
) -> tuple[list[str], list[str]]:
    """Decode every image; return (problems, warnings) as message lines, raising nothing.

    `names` are the paths as the manifest gives them (for messages; default the paths),
    `patients` the patient of each image (None or "" where unknown).
    """
    paths = [str(p) for p in paths]
    rows = list(rows)
    names = [str(n) for n in names] if names is not None else paths
    if not len(rows) == len(names) == len(paths) or (patients is not None and len(patients) != len(paths)):
        raise ValueError("paths, rows, names and patients must have one entry per image")
    workers = workers or min(8, os.cpu_count() or 1)

    problems, low, by_digest = _image_problems(_probes(paths, workers), paths, rows, names)
    warnings: list[str] = _low_range_warnings(low)
    same_problems, same_warnings = _identical_images(by_digest, paths, rows, names, patients)
    return problems + same_problems, warnings + same_warnings


def _probes(paths: list[str], workers: int) -> Iterable[_Probe]:
    """Each image's probe in input order, decoded by `workers` threads; a long cohort shows a
    progress bar (on stderr, so that piped output stays clean)."""
    results: Iterable[_Probe] = ordered_map(_probe, paths, workers)
    if len(paths) > _PROGRESS_OVER:
        from rich.console import Console
        from rich.progress import track

        results = track(
            results, total=len(paths), description="Checking images", transient=True, console=Console(stderr=True)
        )
    return results


def _image_problems(
    results: Iterable[_Probe], paths: list[str], rows: list[int], names: list[str]
) -> tuple[list[str], list[str], dict[bytes, list[int]]]:
    """The problems of each image on its own (unreadable, 2D among 3D, tiny, constant), the
    low-range notes, and the images grouped by pixel digest for the identical-image check.

    An image with a problem is left out of the later checks: one message per bad file."""
    problems: list[str] = []
    dim_first: tuple[int, str] | None = None
    low: list[str] = []
    by_digest: dict[bytes, list[int]] = defaultdict(list)
    for i, probe in enumerate(results):
        where = f"row {rows[i]}: {names[i]}"
        if probe.error is not None:
            problems.append(f"{where}: {probe.error}")
            continue
        ndim = len(probe.shape)
        if dim_first is None:
            dim_first = (ndim, f"row {rows[i]} ({names[i]})")
        elif ndim != dim_first[0]:
            problems.append(
                f"{where}: {_KIND[ndim]}, but {dim_first[1]} is {_KIND[dim_first[0]]}; a cohort holds "
                "either 2D images or 3D volumes (NIfTI), not both"
            )
            continue
        if min(probe.shape) < MIN_SIDE:
            size = "x".join(map(str, probe.shape[::-1]))  # width x height (x depth)
            problems.append(
                f"{where}: the image is only {size} pixels (fewer than {MIN_SIDE} on a side): it "
                "carries no usable detail and would train as a near-constant input; replace it with "
                "the full-size image or remove its row"
            )
            continue
        if probe.hi <= probe.lo:
            problems.append(
                f"{where}: every pixel has the same value, so the image carries no information (a "
                "blank or failed export?); replace the file or remove its row"
            )
            continue
        if probe.hi < LOW_RANGE:
            low.append(_low_range_note(rows[i], names[i], paths[i], probe.hi))
        by_digest[probe.digest].append(i)
    return problems, low, by_digest


def _low_range_warnings(low: list[str]) -> list[str]:
    """One warning for all nearly black images (at most `_SHOWN_ROWS` named): they do not
    stop a run, but usually mean a bit-depth mistake worth fixing before training."""
    warnings: list[str] = []
    if low:
        shown = "; ".join(low[:_SHOWN_ROWS]) + (f"; ... and {len(low) - _SHOWN_ROWS} more" if len(low) > _SHOWN_ROWS else "")
        warnings.append(
            f"{len(low)} image{'s' if len(low) > 1 else ''} use{'' if len(low) > 1 else 's'} less than "
            f"1/{round(1 / LOW_RANGE)} of {'their' if len(low) > 1 else 'its'} intensity range and will look "
            f"nearly black to the network: {shown}. Often 12-bit data saved unscaled in a 16-bit PNG, or "
            "a DICOM whose BitsStored is larger than its values need: re-export scaled to the full range, "
            "or add a PNG sBIT chunk giving the bit depth, or correct BitsStored (stagewise then scales by it)"
        )
    return warnings


def _identical_images(
    by_digest: dict[bytes, list[int]], paths: list[str], rows: list[int], names: list[str],
    patients: Sequence[object] | None,
) -> tuple[list[str], list[str]]:
    """(problems, warnings) for identical pixels in different files: a problem under different
    patients (a leak between folds), a warning otherwise (counted twice, but no leak)."""
    problems: list[str] = []
    warnings: list[str] = []
    for group in by_digest.values():
        if len(group) < 2 or len({file_key(paths[i]) for i in group}) < 2:
            continue  # one file listed twice is the manifest check's business
        who = {i: (str(patients[i]).strip() if patients is not None and patients[i] is not None else "") for i in group}
        listed = ", ".join(f"{names[i]} (patient {who[i]!r})" if who[i] else names[i] for i in group)
        head = f"{_row_list([rows[i] for i in group])} hold identical pixels: {listed}"
        known = {who[i] for i in group if who[i]}
        if len(known) > 1:
            problems.append(
                f"{head}; one image under different patients leaks between training and test folds: "
                "if these are one patient give the rows one patient id, otherwise keep one copy"
            )
        elif known:
            warnings.append(
                f"{head}; the same image of one patient is counted twice in training and in the test "
                "scores: keep one row unless that is intended"
            )
        else:
            warnings.append(f"{head}; keep one copy unless that is intended")
    return problems, warnings


def _low_range_note(row: int, name: str, path: str, hi: float) -> str:
    note = f"row {row} {name} (brightest {hi:.3f}"
    if Path(path).suffix.lower() == ".png" and not is_volume_path(path):
        depth = _png_bit_depth(path)
        if depth:
            article = "an" if depth == 8 else "a"
            note += f", value {round(hi * ((1 << depth) - 1))} of {(1 << depth) - 1} in {article} {depth}-bit PNG"
            if depth == 16 and png_significant_bits(path) is None:
                note += " without sBIT"
    return note + ")"


def _png_bit_depth(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            head = f.read(33)
    except OSError:
        return None
    return head[24] if len(head) >= 25 and head[12:16] == b"IHDR" else None


_KIND = {2: "a 2D image", 3: "a 3D volume"}


def check_images(
    images: "Cohort | Sequence[str | Path]",  # noqa: F821 - a data.cohort.Cohort
    rows: Sequence[int] | None = None,
    *,
    patients: Sequence[object] | None = None,
    names: Sequence[str] | None = None,
    workers: int | None = None,
    manifest: str | Path | None = None,
) -> list[str]:
    """Decode every image; raise one CohortError listing every problem; return warnings.

    `images` is a checked Cohort (rows, patients and the manifest are then taken from it)
    or a list of image paths, with `rows` (the CSV line of each, default 2, 3, ...) and
    optionally `patients` (enables the identical-image-under-two-patients check) and
    `names` (the paths as written in the manifest, for messages). `workers` threads decode
    in parallel (default min(8, CPUs)). Returns warning lines (low intensity range, same
    image twice for one patient): show them once, they do not stop a run.
    """
    if hasattr(images, "table") and hasattr(images, "config"):  # a Cohort (not imported: no cycle)
        t = images.table
        cfg = images.config
        base = Path(cfg.root) if cfg.root is not None else Path(cfg.manifest).parent
        paths = t["path"].tolist()
        rows = t["row"].tolist() if rows is None else rows
        patients = t["patient"].tolist() if patients is None else patients
        names = [_shown(p, base) for p in paths] if names is None else names
        manifest = cfg.manifest if manifest is None else manifest
    else:
        paths = [str(p) for p in images]
        rows = list(range(2, len(paths) + 2)) if rows is None else rows
    problems, warnings = inspect_images(paths, rows, names, patients, workers)
    if problems:
        raise CohortError(problems, manifest, hint=_IMAGE_HINT)
    return warnings


def _shown(path: str, base: Path) -> str:
    """A path relative to the manifest's image root when it lies inside, else as is."""
    try:
        rel = os.path.relpath(path, os.path.abspath(base))
    except ValueError:  # another drive on Windows
        return path
    return path if rel.startswith(os.pardir) else rel
