"""Every check a study can make before it trains, with all problems reported at once.

`stagewise validate` and `stagewise run` share this: a recipe that would fail in its second
arm after the first arm trained all its folds must fail here instead, in seconds. The
checks: every manifest row and every image decoded (data.load_cohort), each arm's
architecture built (without downloading weights) and each of its stages planned against
the groups it really has, source manifests of pretraining stages read and their images
decoded, folds feasible for the protocol (and for nested CV inside them), comparisons
naming units that exist.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stagewise.data import Cohort, CohortError, check_images, load_cohort
from stagewise.data.source import load_source
from stagewise.evaluation.splits import SplitError, make_splits
from stagewise.models import BackboneError, WeightsUnavailable, build_arch, create_backbone
from stagewise.models.registry import get_source
from stagewise.recipe import ArmConfig, CohortConfig, ProtocolConfig, Recipe
from stagewise.recipe.secure_aggregation import secure_aggregation_problems
from stagewise.recipe.strategies import strategy_site_problem
from stagewise.training.stages import stage_kind
from stagewise.training.dp_sgd import stage_batchnorm_problems
from stagewise.training.engine import StageError, plan_stage
from stagewise.study.units import study_units
from stagewise.errors import StagewiseError


class StudyCheckError(StagewiseError, ValueError):
    """A study that cannot run as written; the message lists every problem found."""

    def __init__(self, problems: list[str], source: str):
        self.problems, self.source = problems, source
        lines = [f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''} before any training:"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))

    def __reduce__(self):  # whole across processes (an executor's worker), like CohortError
        return (type(self), (self.problems, self.source))


def missing_manifest_hint(recipe_file: str | Path, manifest: str | Path) -> str | None:
    """When a recipe's manifest does not exist yet and a `prepare_*.py` script beside the
    recipe names that manifest's file (the examples build theirs from ../shared/data), the
    sentence that says which script to run; None otherwise."""
    recipe_file, manifest = Path(recipe_file), Path(manifest)
    if manifest.is_file():
        return None
    for script in sorted(recipe_file.parent.glob("prepare_*.py")):
        if manifest.name in script.read_text(encoding="utf-8", errors="ignore"):
            return (f"{recipe_file}: its manifest {manifest.name} does not exist yet; this example builds it with "
                    f"`python {script}` (run it once, then validate again)")
    return None


def comparison_problems(recipe: Recipe) -> list[str]:
    pairs = recipe.evaluation.compare or []
    names = [u.name for u in study_units(recipe)]
    unknown = sorted({n for pair in pairs for n in pair} - set(names))
    problems = [f"evaluation.compare names unknown arm(s) {unknown}; this study has {names}"] if unknown else []
    primary = recipe.evaluation.primary
    if primary is not None:
        missing = [n for n in (primary.a, primary.b) if n not in names]
        if missing:
            problems.append(f"evaluation.primary names unknown unit(s) {missing}; this study has {names}")
        elif primary.a == primary.b:
            problems.append(f"evaluation.primary compares {primary.a!r} with itself; name two different units")
    return problems


def arm_problems(arm: ArmConfig) -> list[str]:
    """The arm's architecture (random weights; local files are read) and each stage's plan."""
    spec = arm.backbone
    try:
        with torch.random.fork_rng():  # building draws random weights: leave the global stream alone
            if spec.name.split(":", 1)[0] in ("file", "run"):
                backbone = create_backbone(**spec.model_dump())
            else:
                backbone = build_arch(spec.name)
    except (BackboneError, WeightsUnavailable) as err:
        return [f"arm {arm.name!r}: backbone {spec.name}: {err}"]
    groups = backbone.group_names + ["head"]
    problems = []
    unknown = [g for g in arm.sites.local_groups if g not in groups]
    if unknown:
        problems.append(f"arm {arm.name!r}: sites.local_groups names {unknown}, which {spec.name} has not; "
                        f"its groups: {', '.join(groups)}")
    if arm.head.pretrained:
        source = spec.name.split(":", 1)[0]
        loaded = source in ("file", "run")  # read above, so its head is known; a named source declares it
        if not (backbone.published_head is not None if loaded else get_source(source).with_head):
            problems.append(f"arm {arm.name!r}: head.pretrained is set, but {spec.name} comes without a published "
                            "head (bpd: models and their checkpoint files have one); remove head.pretrained")
    for i, stage in enumerate(arm.stages):
        try:
            plan_stage(stage, groups)
        except StageError as err:
            problems.append(f"arm {arm.name!r}, stage {i} ({stage.kind}): {err}")
        check = stage_kind(stage).backbone_problems
        for problem in check(stage, backbone, spec.name) if check else []:
            problems.append(f"arm {arm.name!r}, stage {i} ({stage.kind}): {problem}")
        planar = [k for k in ("crop", "blur") if getattr(stage.augment, k) is not None]
        if planar and backbone.spatial_dims == 3:
            problems.append(f"arm {arm.name!r}, stage {i} ({stage.kind}): augment.{planar[0]} is 2D only and "
                            f"{spec.name} takes volumes; remove it (flip, rotate, scale, translate and mask work in 3D)")
        if stage.augment_on == "features" and backbone.spatial_dims == 3:
            problems.append(f"arm {arm.name!r}, stage {i} ({stage.kind}): augment_on: features is for 2D feature maps "
                            f"and {spec.name} takes volumes; use augment_on: images")
    if arm.sites.privacy is not None:  # DP-SGD needs a gradient per image: no BatchNorm that trains
        for i, stage in enumerate(arm.stages):
            problems += [f"arm {arm.name!r}, stage {i} ({stage.kind}) under sites.privacy: {p}"
                         for p in ([] if stage.external else stage_batchnorm_problems(stage, backbone))]
    return problems


def strategy_site_problems(recipe: Recipe, cohort: Cohort) -> list[str]:
    """Robust aggregators (Krum, Bulyan) need enough sites per round for their
    `num_malicious_nodes`, secure aggregation at least 2 (and no more shares than sites): the
    fewest sites that train in a fold (all sites, one fewer under leave-one-site-out), or
    `sites.min_sites` if a round may complete with fewer."""
    federated = [a for a in recipe.arms if a.sites.mode == "federated"]
    if not federated or "site" not in cohort.table:
        return []
    n = cohort.table["site"].nunique() - (1 if recipe.protocol.kind == "leave_one_site_out" else 0)
    problems = []
    for arm in federated:
        need = min(arm.sites.min_sites or n, n)
        problem = strategy_site_problem(arm.sites.strategy, arm.sites.strategy_params, need)
        if problem:
            problems.append(f"arm {arm.name!r}: {problem}")
        problems += [f"arm {arm.name!r}: {p}" for p in secure_aggregation_problems(arm.sites, need)]
    return problems


def source_problems(recipe: Recipe) -> list[str]:
    """Source manifests of pretrain/ssl stages: rows, targets and every image decoded."""
    problems = []
    for arm in recipe.arms:
        for i, stage in enumerate(arm.stages):
            if not stage.external:
                continue
            try:
                source = load_source(stage.source)
                check_images(source.paths, manifest=stage.source.manifest)
            except CohortError as err:
                problems.append(f"arm {arm.name!r}, stage {i} ({stage.kind}) source: {err}")
    return problems


def split_problems(recipe: Recipe, cohort: Cohort) -> list[str]:
    """Outer folds for the protocol, inner folds for every arm that tunes (nested CV) and for a
    threshold chosen on inner out-of-fold scores."""
    t = cohort.table
    y, patients = t["y"].to_numpy(), t["patient"].to_numpy()
    sites = t["site"].to_numpy() if "site" in t else None
    try:
        splits = make_splits(y, patients, recipe.protocol, recipe.seed, sites)
    except SplitError as err:
        return [f"protocol: {err}"]
    problems = []
    for arm in recipe.arms:
        if arm.tune is None:
            continue
        inner = ProtocolConfig(folds=arm.tune.inner_folds, repeats=1)
        for split in splits:
            try:
                make_splits(y[split.train], patients[split.train], inner, recipe.seed)
            except SplitError as err:
                problems.append(f"arm {arm.name!r}: tune.inner_folds inside fold {split.name}: {err}")
                break
    rule = recipe.protocol.threshold
    if rule.on == "inner_cv" and not rule.fixed:
        inner = ProtocolConfig(folds=rule.folds, repeats=1)
        for split in splits:
            try:
                make_splits(y[split.train], patients[split.train], inner, recipe.seed)
            except SplitError as err:
                problems.append(f"protocol.threshold.folds ({rule.folds} inner folds) inside fold {split.name}: "
                                f"{str(err).split('; patients')[0]}; lower protocol.threshold.folds or choose the "
                                "threshold `on: training`")
                break
    return problems


def site_column_problems(recipe: Recipe) -> list[str]:
    """Per-site arms in a study on one machine need the cohort's site column."""
    multi = [a.name for a in recipe.arms if a.sites.mode != "pooled"]
    if multi and not recipe.cohort.site:
        return [f"arms {multi} train per site (sites.mode) but cohort.site names no site column"]
    return []


def cohort_alone_problems(data: dict, base_dir: Path) -> list[str]:
    """The cohort's problems (manifest rows, image files) of a recipe that is itself invalid,
    so that `validate` reports them with the recipe's errors instead of after they are fixed;
    [] when the cohort section is itself invalid (the recipe's errors say so) or has none."""
    cohort = data.get("cohort")
    try:
        cfg = CohortConfig.model_validate(cohort)
    except ValueError:
        return []
    if not Path(cfg.manifest).is_absolute():
        cfg.manifest = (base_dir / cfg.manifest).resolve()
    if cfg.root is not None and not Path(cfg.root).is_absolute():
        cfg.root = (base_dir / cfg.root).resolve()
    try:
        load_cohort(cfg, decode=True)
    except CohortError as err:
        return [str(err)]
    return []


def check_study(recipe: Recipe, cohort: Cohort | None = None, source: str = "recipe") -> Cohort:
    """Run every check; return the checked cohort or raise one StudyCheckError listing all
    problems (cohort rows and files, arms and stages, source manifests, folds)."""
    problems = site_column_problems(recipe)
    if cohort is None:
        try:
            cohort = load_cohort(recipe.cohort, decode=True)
        except CohortError as err:
            problems.append(str(err))
    for arm in recipe.arms:
        problems += arm_problems(arm)
    problems += source_problems(recipe)
    problems += comparison_problems(recipe)
    if cohort is not None:
        problems += split_problems(recipe, cohort)
        problems += strategy_site_problems(recipe, cohort)
    if problems:
        raise StudyCheckError(problems, source)
    return cohort
