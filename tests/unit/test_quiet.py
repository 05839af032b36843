"""Library noise stays off the screen and goes to log.txt (stagewise.quiet)."""

import logging
import warnings
from pathlib import Path

import stagewise
from stagewise.quiet import is_library_noise, warnings_to_log

OURS = str(Path(stagewise.__file__).parent / "study" / "runner.py")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _on_stagewise_logger():
    handler = _Records()
    logging.getLogger("stagewise").addHandler(handler)
    return handler


def test_flowers_note_on_skipped_evaluation_reaches_the_log_not_the_screen(capfd):
    from stagewise.federated.rounds import make_strategy
    from stagewise.recipe import SitesConfig

    flower, ours, seen = logging.getLogger("flwr"), _on_stagewise_logger(), _Records()
    level = flower.level
    flower.setLevel(logging.INFO)  # as Flower sets it (a simulation elsewhere in the suite may have raised it)
    flower.addHandler(seen)
    try:
        make_strategy(SitesConfig(mode="federated"), 2)
        make_strategy(SitesConfig(mode="federated", strategy="fedprox", strategy_params={"proximal_mu": 0.1}), 2)
        flower.warning("the SuperLink is unreachable")
    finally:
        logging.getLogger("stagewise").removeHandler(ours)
        flower.removeHandler(seen)
        flower.setLevel(level)
    assert "fraction_evaluate" not in capfd.readouterr().err
    assert ours.lines == ["flwr: fraction_evaluate is set to 0.0. Federated evaluation will be skipped."] * 2
    # another Flower warning is not noise: it reaches Flower's handlers (its console) as before
    assert [line for line in seen.lines if "fraction_evaluate" not in line] == ["the SuperLink is unreachable"]
    assert "fraction_evaluate" not in " ".join(seen.lines)


def test_developer_warnings_of_libraries_go_to_the_log_and_ours_to_the_screen():
    handler, shown = _on_stagewise_logger(), []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = warnings_to_log(lambda *a: shown.append(str(a[0])))
            warnings.warn_explicit("Tip: in future versions of Ray ...", FutureWarning, "/site-packages/ray/_private/worker.py", 1)
            warnings.warn_explicit("Mean of empty slice", RuntimeWarning, "/site-packages/numpy/core/_methods.py", 2)
            warnings.warn_explicit("a stagewise deprecation", FutureWarning, OURS, 3)
            warnings.warn_explicit("a library's remark on the input", UserWarning, "/site-packages/pydicom/x.py", 4)
    finally:
        logging.getLogger("stagewise").removeHandler(handler)
    assert shown == ["a stagewise deprecation", "a library's remark on the input"]
    assert handler.lines == ["FutureWarning: Tip: in future versions of Ray ... (worker.py:1)",
                             "RuntimeWarning: Mean of empty slice (_methods.py:2)"]
    assert is_library_noise(DeprecationWarning, "/usr/lib/python3/site-packages/ray/x.py")
    assert not is_library_noise(UserWarning, "/usr/lib/python3/site-packages/ray/x.py")


def test_without_a_run_log_library_noise_prints_nothing(capfd):
    from stagewise.quiet import library_log

    library_log.warning("flwr: fraction_evaluate is set to 0.0")
    assert capfd.readouterr().err == ""
