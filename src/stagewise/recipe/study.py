"""The study around the arms: folds (ProtocolConfig), hardware (ComputeConfig), evidence
(PrimaryComparison, EvaluationConfig), MLflow tracking (TrackingConfig) and the Recipe itself."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_serializer, model_validator
from stagewise.recipe.arms import ArmConfig
from stagewise.recipe.base import StrictModel
from stagewise.recipe.cohort import CohortConfig, DataConfig


THRESHOLD_RULES = ("youden", "sensitivity", "specificity", "net_benefit", "prevalence", "fixed")
"""The named decision-threshold rules (evaluation/thresholds.py computes each)."""


class ThresholdRule(StrictModel):
    """How each fold's decision threshold is chosen, and on which scores. Written as `youden`,
    `prevalence` or a number (fixed) for short, or as a mapping: `{rule: sensitivity, value:
    0.9, on: inner_cv, folds: 3}`; `{fixed: 0.5}` is a fixed threshold. Scores the model trained
    on separate its training patients almost perfectly on a small cohort, which makes a cut-off
    chosen on them close to arbitrary; `inner_cv` chooses on scores of patients each inner
    model did not train on, at the price of `folds` extra fits per outer fold."""

    rule: Literal["youden", "sensitivity", "specificity", "net_benefit", "prevalence", "fixed"] = "youden"
    """youden: max sensitivity + specificity - 1; sensitivity / specificity: the cut-off reaching `value`; net_benefit: max net benefit at risk threshold `value`; prevalence: flag the training prevalence; fixed: `value` itself."""
    value: float | None = None
    """The target sensitivity or specificity, the risk threshold of net_benefit, or the fixed threshold (a probability in (0, 1))."""
    on: Literal["training", "inner_cv"] = "training"
    """training: the scores of the fold model on its own training part; inner_cv: out-of-fold scores of `folds` patient-grouped inner fits of the training part."""
    folds: int = Field(3, ge=2)
    """Inner folds of `on: inner_cv` (a nested-CV arm with as many inner folds reuses its fits)."""

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data):
        if isinstance(data, bool):
            raise ValueError("give youden, prevalence, a probability or a mapping {rule: ..., on: ...}")
        if isinstance(data, (int, float)):
            return {"rule": "fixed", "value": data}
        if isinstance(data, str):
            if data not in ("youden", "prevalence"):
                raise ValueError(f"{data!r} is no threshold rule; write youden, prevalence, a probability, or a "
                                 f"mapping {{rule: one of {', '.join(THRESHOLD_RULES)}, value: ..., on: training|inner_cv}}")
            return {"rule": data, "on": "training"}
        if isinstance(data, dict) and "fixed" in data:
            if set(data) != {"fixed"}:
                raise ValueError("`fixed: VALUE` stands alone (a fixed threshold is chosen on no scores)")
            return {"rule": "fixed", "value": data["fixed"]}
        return data

    @model_validator(mode="after")
    def _value_fits_rule(self) -> "ThresholdRule":
        needs = self.rule in ("sensitivity", "specificity", "net_benefit", "fixed")
        if needs and self.value is None:
            raise ValueError(f"rule {self.rule} needs a value (a probability in (0, 1))")
        if not needs and self.value is not None:
            raise ValueError(f"rule {self.rule} takes no value")
        if self.value is not None and not 0 < self.value < 1:
            raise ValueError(f"value {self.value}: give a probability strictly between 0 and 1")
        return self

    @model_serializer(mode="wrap")
    def _short(self, handler):
        """The short form where it says everything (recipes and fingerprints written before
        the mapping existed read and hash as they did)."""
        if self.rule == "fixed":
            return self.value
        if self.on == "training" and self.rule in ("youden", "prevalence"):
            return self.rule
        return handler(self)

    @property
    def fixed(self) -> bool:
        return self.rule == "fixed"

    @property
    def chosen_on(self) -> str:
        """Where each fold's threshold is chosen, in words."""
        if self.fixed:
            return "fixed in the recipe, chosen on no scores"
        if self.on == "inner_cv":
            return (f"chosen on the out-of-fold scores of {self.folds} patient-grouped inner folds of each training "
                    "part (patients the scoring model did not train on)")
        return "chosen on the training part's own scores (the patients the fold model trained on)"

    def describe(self) -> str:
        """The rule in words: 'youden', 'sensitivity >= 0.9', 'net benefit at risk 0.2', 'fixed at 0.5'."""
        return {"fixed": f"fixed at {self.value}", "sensitivity": f"sensitivity >= {self.value}",
                "specificity": f"specificity >= {self.value}",
                "net_benefit": f"max net benefit at risk threshold {self.value}"}.get(self.rule, self.rule)


class ProtocolConfig(StrictModel):
    kind: Literal["group_kfold", "leave_one_site_out", "balanced_test"] = "group_kfold"
    """group_kfold: repeated stratified group k-fold (recommended). leave_one_site_out.
    balanced_test: the BPD code's folds, to compare like with like, NOT recommended: positive
    patients shuffled into `folds` chunks, each test fold one chunk plus as many negative
    patients taken in turn; negatives beyond the positives' number are never tested, and a
    1:1 test fold reports PPV and NPV at a prevalence the clinic does not have."""
    folds: int = Field(5, ge=2)
    """Folds per repeat (test parts of the cohort); each patient is tested once per repeat."""
    repeats: int = Field(1, ge=1)
    """Times the k-fold split is drawn again with another shuffle (fold seeds from the recipe seed)."""
    test_images: Literal["all", "first"] = "all"
    """first: each test patient is scored on its first image in manifest order (the BPD
    paper); sort the manifest (e.g. by acquisition time) so that first means earliest."""
    patient_aggregate: Literal["mean", "max", "first"] = "mean"
    """How image scores become a patient score for patient-level metrics."""
    threshold: ThresholdRule = ThresholdRule()
    """Decision threshold of every threshold-based figure (balanced accuracy, F1, sensitivity, ..., the bundle's decision): a rule and the scores it is chosen on. Default youden on training scores: in benchmarks/RESULTS.md (decision thresholds) inner out-of-fold scores gave no better test balanced accuracy on the covid, lung-ultrasound and digits cohorts (worse on lung ultrasound), while their inner fits added 1.1 to 2.3 times each fold's training time; a run says when its training scores separate perfectly."""
    label_fractions: list[Annotated[float, Field(gt=0, le=1)]] = []
    """Also train each arm on these fractions of each training fold (whole patients, stratified)."""


class ComputeConfig(StrictModel):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: a CUDA GPU where one is visible, else the CPU; cuda fails when none is visible."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: measured at the start of a run, per arm (architecture, image size, batch size):
    the fastest of fp32 and the low precisions the hardware runs natively (bf16; fp16 on
    CUDA), fp32 unless another is 5 % faster; cached per machine (see training/autotune.py)."""
    channels_last: bool | Literal["auto"] = "auto"
    """Memory layout of 2D convolutions; auto: measured with the precision."""
    reuse_frozen: bool = True
    """Compute a frozen, un-augmented network prefix once per image and reuse it."""
    eval_batch_size: int = Field(64, ge=1)
    """Images per batch when scoring and when computing a frozen prefix (no gradients: larger than training batches)."""
    threads: Annotated[int, Field(ge=1)] | Literal["auto"] | None = "auto"
    """torch's CPU threads. auto: torch's default on an idle machine; when other work holds
    CPUs (load average), the fastest of 1, the free CPUs and all, timed on a few training
    steps, and chosen again before a fold when that load moves by a CPU. A number: that many.
    null: torch's default, never measured."""
    save_models: bool = False
    """Save each fold's trained model (safetensors) in the run directory."""
    executor: Literal["local", "ray"] = "local"
    """Where the fits run: `local`, one after another in this process; `ray`, each (unit,
    fold) fit as a task on a Ray cluster, the run directory written by this process alone.
    Neither changes a fold's numbers, and a run started with one resumes with the other."""
    address: str | None = None
    """ray: the cluster to join, `auto` (the one `ray start` made on this machine) or
    `HOST:PORT` of its head; empty: start a Ray instance on this machine for the run."""
    cpus_per_task: int | None = Field(None, ge=1)
    """ray: CPUs each fit reserves, and its torch threads (default: `threads`, else 1). A
    local run gives bit-identical numbers on a CPU when its `threads` is the same."""
    gpus_per_task: float | None = Field(None, ge=0)
    """ray: GPUs each fit reserves (default: 1 where the cluster has GPUs and `device` is not
    cpu, else 0)."""
    max_retries: int = Field(3, ge=0)
    """ray: times a fit is started again when its worker process or node died; a fit that
    raised an error is never retried (the error stops the run)."""

    @model_validator(mode="after")
    def _address_is_for_ray(self) -> "ComputeConfig":
        if self.address is not None and self.executor != "ray":
            raise ValueError(f"address {self.address!r} is the Ray cluster to join: it needs executor: ray")
        return self


class PrimaryComparison(StrictModel):
    """`evaluation.primary`: which pair (A vs B) and which test carry the study's claim. The
    corrected resampled t-test on fold AUROCs is the default because a claim about the
    training procedure is a claim across folds (DeLong is conditional on the pooled patients)."""

    a: str
    """The first arm of the pair (an arm name, `baseline:<column>` or `clinical`)."""
    b: str
    """The arm it is compared with."""
    test: Literal["corrected_t", "delong", "wilcoxon"] = "corrected_t"
    """corrected_t: corrected resampled t-test on fold AUROCs; delong: DeLong's test on the pooled out-of-fold patient scores; wilcoxon: signed-rank test on fold AUROCs."""


class EvaluationConfig(StrictModel):
    """What turns fold results into evidence: comparisons, intervals, baselines, saliency."""

    compare: list[tuple[str, str]] | None = None
    """Pairs of arm names (`baseline:<column>` and `clinical` included); default: every arm
    against the first arm, and every model arm against every baseline."""
    primary: PrimaryComparison | None = None
    """The study's primary comparison and its test, stated before the results: only its p is
    read as a test of the study's claim (coloured in the report); the other comparisons' p are
    Holm-adjusted for multiplicity. Default: the first comparison, corrected resampled t."""
    bootstrap: int = Field(2000, ge=0)
    """Bootstrap resamples of patients for 95 % CIs; 0 turns them off."""
    clinical_model: bool = True
    """Fit a clinical-only logistic regression on `cohort.clinical` as an arm of its own."""
    saliency: int = Field(4, ge=0)
    """Grad-CAM maps for this many correct and this many wrong test images per arm."""
    recalibrate: Literal["none", "intercept", "slope"] = "none"
    """In-study logistic recalibration of every model unit, per fold: fitted on the patient
    scores of the fold's training part (`intercept`: calibration-in-the-large only; `slope`:
    intercept and slope), applied to its test patients' scores; the report shows the recalibrated calibration
    and decision curves beside the raw ones (meant for CutMix/MixUp arms, whose mixed labels
    pull predictions to the middle). AUROC is unchanged by it. Off (`none`) by default."""
    report: bool = True
    """Write report.html at the end of the run (`stagewise report` writes it later)."""


class TrackingConfig(StrictModel):
    """Experiment tracking in MLflow (stagewise.study.tracking): one MLflow run per study, nested
    runs per unit and fold. `tracking: mlflow` (or `{}`) turns it on with the defaults."""

    mlflow: bool = True
    """false turns tracking off, even where MLFLOW_TRACKING_URI is set."""
    uri: str | None = None
    """The tracking server or store, e.g. http://127.0.0.1:5000; default: MLFLOW_TRACKING_URI,
    else a local store inside the run directory (mlflow.db, artifacts in mlartifacts/)."""
    experiment: str | None = None
    """The MLflow experiment (default: the recipe's name)."""


class Recipe(StrictModel):
    name: str
    """The study's name: the default run directory (runs/<name>) and the MLflow experiment."""
    seed: int = 0
    """Seeds the folds and every fold's training: the same recipe and seed give the same numbers."""
    cohort: CohortConfig
    """The study's cohort manifest and its columns."""
    data: DataConfig = DataConfig()
    """How images are sized for the network."""
    protocol: ProtocolConfig = ProtocolConfig()
    """The folds every arm is evaluated on, and the decision threshold."""
    compute: ComputeConfig = ComputeConfig()
    """Hardware and speed settings; none changes what is computed, only how fast."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """Comparisons, confidence intervals, baselines and saliency maps."""
    tracking: TrackingConfig | None = None
    """MLflow tracking; off unless given here or MLFLOW_TRACKING_URI is set."""
    arms: list[ArmConfig] = Field(min_length=1)
    """The models compared: each arm is a backbone, a head and its stages, trained on every fold."""

    @field_validator("tracking", mode="before")
    @classmethod
    def _tracking_shorthand(cls, v):
        """`tracking: mlflow` (or true) for the defaults, `tracking: false` for off."""
        if v == "mlflow" or v is True:
            return {}
        return {"mlflow": False} if v is False else v

    @model_validator(mode="after")
    def _unique_arms(self) -> "Recipe":
        names = [a.name for a in self.arms]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"arm names must be unique; repeated: {sorted(dup)}")
        if self.protocol.kind == "leave_one_site_out" and not self.cohort.site:
            raise ValueError("protocol.kind leave_one_site_out needs cohort.site")
        # A study's per-site arms need cohort.site: checks.site_column_problems (a deployed
        # federated job runs on one site's manifest at each hospital, with no site column).
        local = [a.name for a in self.arms if a.sites.mode == "local"]
        if local and self.protocol.kind == "leave_one_site_out":
            raise ValueError(f"arms {local}: a held-out site has no local model; local arms need protocol group_kfold "
                             "(their cross-site figures score each site's model on the other sites)")
        kept = [a.name for a in self.arms if a.sites.local_groups]
        if kept and self.protocol.kind == "leave_one_site_out":
            raise ValueError(f"arms {kept}: groups kept at each site (sites.local_groups) have no global version, so "
                             "the held-out site has no model; use protocol group_kfold or remove sites.local_groups")
        crossed = [a.name for a in self.arms if a.sites.cross_site_evaluation]
        if crossed and self.protocol.kind == "leave_one_site_out":
            raise ValueError(f"arms {crossed}: sites.cross_site_evaluation scores each site's model on the other sites' "
                             "test patients, but under leave_one_site_out only the held-out site has test patients and "
                             "it has no site model (the global model scores it); use protocol group_kfold or remove "
                             "sites.cross_site_evaluation")
        published = [a.name for a in self.arms if a.head.pretrained]
        if published and self.cohort.extra_outcomes:
            raise ValueError(f"arms {published} start from a published one-outcome head (head.pretrained), but "
                             "cohort.extra_outcomes asks for more outcomes; remove one of them")
        fused = [a.name for a in self.arms if a.head.fusion]
        if fused and not self.cohort.clinical:
            raise ValueError(f"arms {fused} fuse clinical data (head.fusion) but cohort.clinical lists no columns")
        return self
