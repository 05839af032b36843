"""Training: one stage on one set of rows (`engine`), the stage kinds (`stages/`), the
frozen-prefix cache, compute choices, augmentation, memory metering and nested-CV tuning."""

from stagewise.training import stages  # noqa: F401 - registers every stage kind before any stage trains
