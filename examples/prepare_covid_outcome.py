"""Build a stagewise manifest for the ieee8023 part of ../shared/data/covid-cxr-outcome.

    python examples/prepare_covid_outcome.py [--data DIR] [--out CSV] [--without-hannover]

Columns: path, patient, went_icu, survival, age, sex, offset, view, ap_view (1 = AP or
AP Supine, 0 = PA), hannover (1 = image also in the Hannover repository), site (hannover,
southern-europe or elsewhere, from the `location` column), finding, metadata_row.

One row per frontal chest X-ray (views PA, AP, AP Supine) that has a staged PNG and a
known ICU outcome (`went_icu` Y or N; blank and free text such as "Would have been
stated" are unknown and dropped). Image paths are written ABSOLUTE, so the manifest can
live anywhere; images are never copied.

Upstream lists five files twice under two patient ids (285/339 and 287/340, see
`duplicate_of_metadata_row` in metadata_staged.csv). Each pair is one patient: the second
id is mapped to the first and the repeated image rows are dropped, so the same file is
never on both sides of a cross-validation split.

With `--without-hannover` the rows that are Hannover images (`hannover` = 1: the same films
as in ../shared/data/covid-cxr-outcome/hannover, under other names and patient ids) are left
out, so that a bundle trained on this manifest can be validated externally on the Hannover
repository with no image or patient on both sides (benchmarks/bench_external.py does so).

Rows are ordered by patient, then by `offset` (days since symptom onset or admission;
unknown last), so "the first image of a patient" (protocol.test_images: first) is the
earliest one.

Beside the manifest, covid-outcome.prepare.json counts the rows left out on the way (a
duplicate file, a lateral or unknown view, no staged PNG, an unknown outcome): the study
report's participant flow starts from it.

Data: `--data`, else $STAGEWISE_DATA, else <repo root>/../shared/data. Output: `--out`,
default <repo root>/runs/cohorts/covid-outcome.csv, or covid-outcome-without-hannover.csv
with `--without-hannover` (runs/ is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
FRONTAL = ("PA", "AP", "AP Supine")
CARRY = ("survival", "age", "sex", "offset")
"""Columns carried along unchanged (for clinical fusion, baselines, picking the admission image)."""


def default_data() -> Path:
    return Path(os.environ.get("STAGEWISE_DATA") or REPO.parent / "shared" / "data")


def site_of(location: str, hannover: int) -> str:
    """Three sites for multi-site studies (examples/covid-multisite.yaml), from the
    `location` column: Hannover Medical School's images, the Italian and Spanish case
    reports, and everything else."""
    if hannover or "Hannover" in location:
        return "hannover"
    if any(country in location for country in ("Italy", "Spain")):
        return "southern-europe"
    return "elsewhere"


def build_manifest(data: Path) -> tuple[pd.DataFrame, dict]:
    folder = Path(data) / "covid-cxr-outcome" / "ieee8023"
    meta_path = folder / "metadata_staged.csv"
    if not meta_path.is_file():
        raise SystemExit(f"error: {meta_path} not found; pass --data or set STAGEWISE_DATA to the folder holding covid-cxr-outcome/")
    meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    stats = {"staged rows": len(meta)}

    # The duplicate pairs: a row naming another metadata row is the same file under another id.
    by_meta_row = meta.set_index("metadata_row")
    dup = meta[meta["duplicate_of_metadata_row"].str.strip() != ""]
    alias: dict[str, str] = {}
    for _, r in dup.iterrows():
        original = by_meta_row.loc[r["duplicate_of_metadata_row"].strip(), "patientid"]
        if r["png_file"] != by_meta_row.loc[r["duplicate_of_metadata_row"].strip(), "png_file"]:
            raise SystemExit(f"error: metadata row {r['metadata_row']} is marked as a duplicate but its file differs")
        alias[r["patientid"]] = original
    meta = meta.drop(index=dup.index)
    stats["duplicate image rows dropped"] = len(dup)
    meta["patient"] = meta["patientid"].map(lambda p: alias.get(p, p))
    stats["patient ids merged"] = ", ".join(f"{a}->{b}" for a, b in sorted(alias.items())) or "none"

    frontal = meta[meta["view"].str.strip().isin(FRONTAL)]
    stats["frontal rows"] = len(frontal)
    paths = frontal["png_file"].str.strip().map(lambda p: str((folder / p).resolve()) if p else "")
    has_png = paths.map(lambda p: bool(p) and os.path.isfile(p))
    stats["frontal rows without a staged png"] = int((~has_png).sum())
    frontal = frontal[has_png].assign(path=paths[has_png])

    outcome = frontal["went_icu"].str.strip().str.upper()
    known = outcome.isin(["Y", "N"])
    stats["frontal rows with unknown went_icu (dropped)"] = int((~known).sum())
    table = frontal[known].assign(went_icu=outcome[known])

    # One patient, one outcome: stagewise rejects conflicts, so catch them here with a clear message.
    conflicts = table.groupby("patient")["went_icu"].nunique()
    conflicts = conflicts[conflicts > 1]
    if len(conflicts):
        raise SystemExit(f"error: patients with conflicting went_icu labels: {list(conflicts.index)}")
    if table["path"].duplicated().any():
        raise SystemExit(f"error: files listed twice: {sorted(table.loc[table['path'].duplicated(), 'path'])}")

    offset = pd.to_numeric(table["offset"], errors="coerce")
    table = (
        table.assign(_offset=offset, _order=range(len(table)))
        .sort_values(["patient", "_offset", "_order"], na_position="last", kind="stable")
    )
    # Non-image "shortcut" scores a model must beat (usable as cohort.baselines): the view
    # (AP and AP supine films are mostly taken of sicker, bed-bound patients) and the source.
    table["ap_view"] = (table["view"].str.strip() != "PA").astype(int)
    table["hannover"] = (table["also_in_hannover_repo"].str.strip() == "Y").astype(int)
    table["site"] = [site_of(loc, h) for loc, h in zip(table["location"], table["hannover"])]
    columns = ["path", "patient", "went_icu", *CARRY, "view", "ap_view", "hannover", "site", "finding", "metadata_row"]
    return table[columns].reset_index(drop=True), stats


def without_hannover(table: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The manifest without its Hannover images (column `hannover`), and how many rows left."""
    keep = table["hannover"] == 0
    return table[keep].reset_index(drop=True), int((~keep).sum())
def prepare_counts(stats: dict, kept: int) -> dict:
    """The rows left out before the manifest, for stagewise's participant flow (the report reads
    <manifest>.prepare.json beside the manifest): counts only, no patient id."""
    after_dup = stats["staged rows"] - stats["duplicate image rows dropped"]
    steps = [
        ("ieee8023 rows with a staged image", stats["staged rows"]),
        ("left out: the same file listed twice under two patient ids", stats["duplicate image rows dropped"]),
        ("left out: not a frontal view (PA, AP, AP Supine)", after_dup - stats["frontal rows"]),
        ("left out: frontal, but no staged PNG", stats["frontal rows without a staged png"]),
        ("left out: ICU outcome unknown (blank or free text)", stats["frontal rows with unknown went_icu (dropped)"]),
    ]
    hannover = stats.get("Hannover image rows left out (--without-hannover)")
    if hannover is not None:
        steps.append(("left out: Hannover images (--without-hannover)", hannover))
    assert steps[0][1] - sum(n for _, n in steps[1:]) == kept, "the counts must add up to the manifest's rows"
    return {"about": "rows examples/prepare_covid_outcome.py left out before this manifest",
            "steps": [{"step": step, "rows": int(n)} for step, n in steps]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="folder holding covid-cxr-outcome/ (default: $STAGEWISE_DATA or <repo>/../shared/data)")
    ap.add_argument("--out", type=Path, default=None, help="manifest to write (default: runs/cohorts/covid-outcome.csv, "
                    "with --without-hannover covid-outcome-without-hannover.csv)")
    ap.add_argument("--per-site", action="store_true", help="also write one manifest per site beside it "
                    "(covid-outcome-<site>.csv), each hospital's own for `stagewise federation site`")
    ap.add_argument("--without-hannover", action="store_true", help="leave out the rows that are Hannover images "
                    "(column hannover), for an external validation on the Hannover repository")
    args = ap.parse_args(argv)

    data = (args.data or default_data()).expanduser().resolve()
    table, stats = build_manifest(data)
    if args.without_hannover:
        table, stats["Hannover image rows left out (--without-hannover)"] = without_hannover(table)
    args.out = args.out or REPO / "runs" / "cohorts" / f"covid-outcome{'-without-hannover' if args.without_hannover else ''}.csv"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    args.out.with_suffix(".prepare.json").write_text(json.dumps(prepare_counts(stats, len(table)), indent=1))

    for k, v in stats.items():
        print(f"{k}: {v}")
    patients = table.groupby("patient", sort=False)["went_icu"].first()
    pos_img = int((table["went_icu"] == "Y").sum())
    pos_pat = int((patients == "Y").sum())
    per = table.groupby("patient").size()
    print(f"manifest: {len(table)} images, {len(patients)} patients "
          f"(1-{per.max()} images each, median {per.median():g})")
    print(f"went_icu=Y: {pos_img} images / {len(table) - pos_img} N; "
          f"patients {pos_pat} Y / {len(patients) - pos_pat} N (positives per patient: {pos_pat / len(patients):.3f})")
    for site, part in table.groupby("site"):
        labels = part.groupby("patient")["went_icu"].first()
        print(f"site {site}: {len(part)} images, {len(labels)} patients ({int((labels == 'Y').sum())} went to ICU)")
        if args.per_site:
            path = args.out.with_name(f"{args.out.stem}-{site}.csv")
            part.to_csv(path, index=False)
            print(f"wrote {path.resolve()}")
    print(f"wrote {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
