"""The study layer: check a recipe against its cohort, plan the units and folds, fit each
(unit, fold) through an executor, write the run directory, and refit an arm on every image.

`run_study` is the entry point; `check_study` runs every check without training.
"""

from stagewise.study.fitting import FoldOutput, Reporter, SilentReporter, Study, refit
from stagewise.study.preflight import StudyCheckError, check_study
from stagewise.study.runner import StudyResult, record_fold, run_study

__all__ = ["FoldOutput", "Reporter", "SilentReporter", "Study", "StudyCheckError", "StudyResult", "check_study",
           "record_fold", "refit", "run_study"]
