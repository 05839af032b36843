"""An arm of the study: its network and stages (ArmConfig), its nested-CV grid (TuneConfig) and
how it trains across the cohort's sites (SitesConfig)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from stagewise.recipe.base import StrictModel
from stagewise.recipe.network import BackboneConfig, HeadConfig
from stagewise.recipe.privacy import PrivacyConfig, privacy_problems
from stagewise.recipe.secure_aggregation import (SecureAggregationConfig, secure_aggregation_problems,
                                                 secure_aggregation_text)
from stagewise.recipe.stages import STAGE_CLASSES, SslStage, StageConfig
from stagewise.recipe.strategies import STRATEGIES, STRATEGY_NAMES, strategy_param_problems

StrategyName = Literal[tuple(STRATEGIES)]  # type: ignore[valid-type]  # the names of recipe/strategies.py


class TuneConfig(StrictModel):
    """Nested CV: an inner grouped CV inside each outer training fold picks one grid point."""

    grid: dict[str, list] = Field(min_length=1)
    """Dotted paths into the arm -> candidate values, e.g. `stages.0.lr: [1.0e-3, 3.0e-3]`."""
    inner_folds: int = Field(3, ge=2)
    """Folds of the inner CV (grouped by patient, inside each outer training fold)."""

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, v: dict[str, list]) -> dict[str, list]:
        for path, values in v.items():
            if not values:
                raise ValueError(f"grid.{path} has no candidate values")
        return v


class SitesConfig(StrictModel):
    """How an arm trains across the cohort's sites (the `site` column); every mode runs on
    the same patient-grouped folds, so the modes can be compared on the same patients."""

    mode: Literal["pooled", "local", "federated"] = "pooled"
    """pooled: all training rows in one place; local: each site trains on its own rows and
    scores its own test patients (and, for cross-site figures, the other sites'); federated:
    each site is a Flower client with its own rows only, a server aggregates."""
    strategy: StrategyName = "fedavg"
    """The Flower strategy that aggregates (federated only): FedAvg, server-side optimizers
    (fedavgm, fedadam, fedyogi, fedadagrad), FedProx, or a robust aggregator (fedmedian,
    fedtrimmedavg, krum, multikrum, bulyan)."""
    strategy_params: dict[str, float] = {}
    """Its parameters, e.g. {proximal_mu: 0.01} for fedprox, {server_momentum: 0.9} for fedavgm,
    {eta: 0.01} for fedadam, {num_malicious_nodes: 1} for krum (Flower's names and defaults)."""
    bn_stats: Literal["average", "local"] = "average"
    """BatchNorm of the shared groups: averaged like the other weights, or kept at each site
    (FedBN: BatchNorm weights and statistics never leave a site)."""
    local_groups: list[str] = []
    """Layer groups that stay at each site, never sent nor aggregated (FedPer/FedRep, e.g.
    [head]): each site trains its own and scores its patients with them (federated only)."""
    lr_schedule: Literal["each_round", "across_rounds"] = "each_round"
    """A federated stage's LR schedule (onecycle, cosine): whole in each round's local epochs,
    restarting every round (Flower's usual local training), or once across all of the stage's
    rounds, each round continuing where the last ended, as pooled training runs it over the
    stage's epochs (federated only)."""
    min_sites: int | None = Field(None, ge=1)
    """Fewest sites a round may complete with (default: all); fewer replies fail the fold."""
    round_timeout: float = Field(3600.0, gt=0)
    """Seconds the server waits for the sites' replies in a round."""
    privacy: PrivacyConfig | None = None
    """Record-level differential privacy at each site (DP-SGD with an accounted budget); none by default."""
    cross_site_evaluation: bool = False
    """Score every site's own model (site_local stages, local_groups) on every other site's test
    patients: the site models then leave their sites (federated only; off by default)."""
    secure_aggregation: SecureAggregationConfig | None = None
    """Flower's SecAgg+ in every round (`true` for its defaults): the coordinator sees only the sites' sum; none by default."""

    @field_validator("secure_aggregation", mode="before")
    @classmethod
    def _secure_aggregation_flag(cls, v):
        """`secure_aggregation: true` is SecAgg+ with its defaults, `false` none."""
        return ({} if v else None) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _strategy_params_valid(self) -> "SitesConfig":
        problems = strategy_param_problems(self.strategy, self.strategy_params) + secure_aggregation_problems(self)
        if self.local_groups and self.mode != "federated":
            problems.append("local_groups: only a federated arm (mode: federated) keeps groups at its sites")
        if self.lr_schedule != "each_round" and self.mode != "federated":
            problems.append("lr_schedule: only a federated arm (mode: federated) trains in rounds")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def strategy_text(sites: dict) -> str:
    """A federated arm's aggregation in words, from its `sites` settings as recipe.yaml holds
    them (`SitesConfig.model_dump()`): the strategy with its parameters, and where BatchNorm
    stays, e.g. 'FedProx (proximal_mu 0.01); BatchNorm averaged with the weights', and whether
    the sites' updates were securely aggregated."""
    strategy = sites.get("strategy") or "fedavg"
    params = sites.get("strategy_params") or {}
    name = STRATEGY_NAMES.get(strategy, strategy)
    text = name + (f" ({', '.join(f'{k} {v:g}' for k, v in params.items())})" if params
                   else " (Flower's default parameters)")
    bn = ("FedBN: BatchNorm weights and statistics stay at each site" if sites.get("bn_stats") == "local"
          else "BatchNorm of the groups that train averaged with their weights")
    kept = sites.get("local_groups") or []
    spans = "; each stage's LR schedule spans its rounds" if sites.get("lr_schedule") == "across_rounds" else ""
    return (f"{text}; {bn}" + (f"; {', '.join(kept)} kept at each site, never aggregated (FedPer)" if kept else "")
            + spans + secure_aggregation_text(sites.get("secure_aggregation")))


class ArmConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    """Used as a folder name in the run directory: letters, digits, `_ . + -`."""
    backbone: BackboneConfig
    """The pretrained network (`source:name`, e.g. `xrv:resnet50-res512-all`), or its spec with a local weights file."""
    head: HeadConfig = HeadConfig()
    """The head on the backbone's features."""
    stages: list[StageConfig] = Field(min_length=1)
    """The training stages in order; each stage's `kind` picks its fields."""
    tune: TuneConfig | None = None
    """Nested CV over a grid of this arm's settings; unset: no tuning."""
    sites: SitesConfig = SitesConfig()
    """Pooled, local or federated training across the cohort's sites."""

    @model_validator(mode="after")
    def _rounds_only_federated(self) -> "ArmConfig":
        federated = self.sites.mode == "federated"
        for i, stage in enumerate(self.stages):
            if stage.external or isinstance(stage, SslStage):
                if stage.rounds is not None:
                    raise ValueError(f"stage {i} ({stage.kind}) runs centrally before the sites train: no `rounds`")
                if federated and isinstance(stage, SslStage) and not stage.external:
                    raise ValueError(f"stage {i}: an ssl stage on the target is not federated; give it a source manifest")
            elif federated and stage.rounds is None and not stage.site_local:
                raise ValueError(f"stage {i} ({stage.kind}) of a federated arm needs `rounds` (epochs = local epochs per round)")
            elif not federated and stage.rounds is not None:
                raise ValueError(f"stage {i} ({stage.kind}) has `rounds`, which only a federated arm (sites.mode) uses")
            if federated and stage.epochs == 0:
                raise ValueError(f"stage {i} ({stage.kind}): a federated stage needs epochs >= 1 (local epochs per round)")
            if federated and not stage.federated and not stage.external:
                usable = [c.model_fields["kind"].default for c in STAGE_CLASSES if c.federated]
                raise ValueError(f"stage {i}: {stage.kind} stages are not federated; use "
                                 f"{', '.join(usable[:-1])} or {usable[-1]}")
        if federated and self.tune is not None:
            raise ValueError("nested CV (tune) is not available for federated arms")
        if federated and self.head.fusion:
            raise ValueError("clinical fusion heads are not federated (their scaling would pool sites' statistics)")
        return self

    @model_validator(mode="after")
    def _site_local_stages_last(self) -> "ArmConfig":
        """Personalisation (`site_local: true`) follows federation: federated arms only, after
        at least one federated stage, with no federated stage after it, and no rounds."""
        local = [i for i, s in enumerate(self.stages) if s.site_local]
        rounds = [i for i, s in enumerate(self.stages) if s.rounds is not None]
        for i in local:
            if self.sites.mode != "federated":
                raise ValueError(f"stage {i}: site_local (personalisation after federated stages) is for federated "
                                 "arms (sites.mode: federated); a local arm's stages all run at each site alone")
            if self.stages[i].rounds is not None:
                raise ValueError(f"stage {i}: a site_local stage runs once at each site for its epochs; remove `rounds`")
            if not rounds or max(rounds) > i:
                raise ValueError(f"stage {i}: a site_local stage comes after the federated stages (those with "
                                 "`rounds`), at least one of them")
        return self

    def with_values(self, point: dict) -> "ArmConfig":
        """A copy with dotted paths (`stages.1.epochs`) set, validated; no `tune` of its own."""
        data = self.model_dump(mode="json")
        data["tune"] = None
        for path, value in point.items():
            node, parts = data, path.split(".")
            try:
                for part in parts[:-1]:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                last = int(parts[-1]) if isinstance(node, list) else parts[-1]
                node[last]  # noqa: B018 - the field must exist before it is set
            except (KeyError, IndexError, TypeError, ValueError):
                raise ValueError(f"tune.grid path {path!r} does not name a field of arm {self.name!r}") from None
            node[last] = value
        return ArmConfig.model_validate(data)

    @model_validator(mode="after")
    def _cross_site_needs_site_models(self) -> "ArmConfig":
        """Cross-site evaluation scores the models each site ends with; an arm whose sites all
        end with the global model has none to send (and a local arm has its figures anyway)."""
        if not self.sites.cross_site_evaluation:
            return self
        if self.sites.mode != "federated":
            raise ValueError("sites.cross_site_evaluation is for a federated arm (sites.mode: federated); a local "
                             "arm's cross-site figures are computed without it")
        if not self.sites.local_groups and not any(s.site_local for s in self.stages):
            raise ValueError("sites.cross_site_evaluation: every site of this arm ends with the global model, so there "
                             "are no site models to score on the other sites; add a site_local stage or "
                             "sites.local_groups, or remove sites.cross_site_evaluation")
        return self

    @model_validator(mode="after")
    def _privacy_fits(self) -> "ArmConfig":
        if self.sites.privacy is not None and (problems := privacy_problems(self)):
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _external_stages_first(self) -> "ArmConfig":
        seen_fold_stage = False
        for i, stage in enumerate(self.stages):
            if stage.external and seen_fold_stage:
                raise ValueError(
                    f"stage {i} ({stage.kind} on a source manifest) follows a stage on the cohort; "
                    "stages on source manifests come first (they run once, before cross-validation)"
                )
            seen_fold_stage |= not stage.external
        if not seen_fold_stage:
            raise ValueError("an arm needs at least one stage on the study cohort (probe, thaw, finetune, ...)")
        return self

    @model_validator(mode="after")
    def _grid_paths_exist(self) -> "ArmConfig":
        if self.tune is not None:
            for path, values in self.tune.grid.items():
                self.with_values({path: values[0]})
        return self

    @field_validator("stages", mode="before")
    @classmethod
    def _flatten_stage_lists(cls, v):
        """`stages: [*pretraining, *finetune]`: YAML anchors of stage lists nest; flatten them."""
        if isinstance(v, list):
            return [s for item in v for s in (item if isinstance(item, list) else [item])]
        return v

    @field_validator("backbone", mode="before")
    @classmethod
    def _backbone_from_str(cls, v):
        return {"name": v} if isinstance(v, str) else v
