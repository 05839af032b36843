"""External validation of an exported bundle on another site's labelled cohort
(`stagewise evaluate BUNDLE MANIFEST`): TRIPOD+AI's test of a model on data it was not
trained on, from a hospital or period other than the development cohort's. That the data is
new is checked, not assumed (`overlap`: the bundle's record of its training images and
patients); a cohort that overlaps is evaluated but not called external.

Split by job: `options` (what the user may change, checked all at once), `manifest` (the
manifest read and checked as `stagewise run` reads one, scored by the bundle), `overlap`
(the cohort against the bundle's training set, the figures without the overlapping
patients), `validation` (the figures, computed by stagewise.evaluation), `outputs` (the
output folder and the recalibrated bundle). `evaluate_bundle` in `evaluate` ties them together.

A federated evaluation validates one bundle at several hospitals at once without moving their
data (`stagewise federation evaluate`): `site_summary` (a site's side: its manifest scored
locally, only aggregates prepared), `federated_app` (the Flower ServerApp and ClientApp),
`federated_results` (pooling and the report), `federated_evaluation` (the Python API:
`evaluate_across_sites`, `plan_evaluation`, `coordinate_evaluation`).
"""

from stagewise.external.evaluate import evaluate_bundle
from stagewise.external.federated_evaluation import evaluate_across_sites
from stagewise.external.options import EvaluateError, ExternalOptions

__all__ = ["EvaluateError", "ExternalOptions", "evaluate_across_sites", "evaluate_bundle"]
