"""`compute.threads: auto` in a study: the thread count chosen (training/threads.py) on a
training step of the fold's own arm, at its image and batch size, and said where a person
sees it: log.txt, the screen, and metrics.json's `thread_choices`."""

from __future__ import annotations

import logging

from stagewise.training.autotune import training_step
from stagewise.training.start import seeded_backbone
from stagewise.training.threads import ThreadChooser, describe_choice

log = logging.getLogger("stagewise")


def thread_chooser(recipe) -> ThreadChooser | None:
    """A chooser for a local run whose recipe leaves the threads to `auto`, else None."""
    return ThreadChooser() if recipe.compute.threads == "auto" and recipe.compute.executor == "local" else None


def choose_threads(study, arm) -> None:
    """Choose the thread count for `arm`'s next fold (timing its training step when the
    machine is busy), record the choice and say it."""
    first = study.threads.current is None
    backbone = seeded_backbone(arm, study.recipe.seed)
    shape = (max(max(s.batch_size for s in arm.stages), 2), 1) + (study.recipe.data.image_size,) * backbone.spatial_dims
    record = study.threads.choose(lambda: training_step(backbone, shape, study.compute)())
    study.thread_choices.append({"before": arm.name, **record})
    text = f"compute.threads auto: {describe_choice(record)}" + ("" if first else ", chosen again: the load moved")
    log.info(text)
    say = getattr(study.reporter, "message", None)
    if say is not None and (record["measured"] or not first):
        say(text)
