"""The Flower strategies a federated arm may aggregate with, and the parameters each takes.

One table (`STRATEGIES`) is the recipe's list of `sites.strategy` names, the check of
`sites.strategy_params` (names and values, when the recipe loads; the number of sites a
robust aggregator needs, in `stagewise validate` once the cohort's sites are known), the
names the report writes, and the Flower class `federated.rounds.make_strategy` builds.

Only an aggregation's own parameters are offered. What stagewise decides itself (every
site trains in every round, how many must reply: `sites.min_sites`) is not, nor Flower's
`eta_l` of FedAdam/FedYogi/FedAdagrad: the sites' learning rate is each stage's `lr`, and
Flower's server-side optimizers only log `eta_l`. Not offered at all: QFedAvg (it needs a
client learning rate and loss key of its own), the XGBoost strategies (no tensors), and the
differential-privacy wrappers (they wrap one of these).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Param:
    """A strategy parameter's valid values: `low` <= value (< if `low_open`), value < `high`
    (<= if not `high_open`), a whole number if `integer`."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = True
    integer: bool = False

    def problem(self, value: float) -> str | None:
        """Why `value` is refused (None: it is valid)."""
        if not math.isfinite(value):
            return "must be a finite number"
        if self.integer and not float(value).is_integer():
            return "must be a whole number"
        low_ok = value > self.low if self.low_open else value >= self.low
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if low_ok and high_ok:
            return None
        lo = f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = "" if self.high is None else f" and {'<' if self.high_open else '<='} {self.high:g}"
        return f"must be {lo}{hi}"


@dataclass(frozen=True)
class StrategySpec:
    title: str
    """The name its papers (and Flower) write."""
    flower: str
    """Its class in `flwr.serverapp.strategy`."""
    params: dict[str, Param] = field(default_factory=dict)
    """The parameters a recipe may set, passed to the class as they are (whole numbers as int)."""
    sites_needed: Callable[[dict[str, float]], tuple[int, str]] | None = None
    """(fewest sites a round must aggregate for these parameters, the rule in words)."""


def _krum_sites(params: dict[str, float]) -> tuple[int, str]:
    f = int(params.get("num_malicious_nodes", 0))
    m = int(params.get("num_nodes_to_select", 1))
    need = max(2 * f + 3, f + m)
    return need, f"Krum tolerates f = num_malicious_nodes ({f}) faulty sites among n >= 2f + 3" + (
        f", and selects num_nodes_to_select ({m}) of the n - f honest ones" if m > 1 else "")


def _bulyan_sites(params: dict[str, float]) -> tuple[int, str]:
    f = int(params.get("num_malicious_nodes", 0))
    return 4 * f + 3, f"Bulyan needs n >= 4f + 3 sites for f = num_malicious_nodes ({f}); with fewer Flower skips the round"


_UNIT = Param(0.0, 1.0)  # a decay or momentum: [0, 1)
_POSITIVE = Param(0.0, low_open=True)
_OPT = {"eta": _POSITIVE, "beta_1": _UNIT, "beta_2": _UNIT, "tau": _POSITIVE}
_MALICIOUS = Param(0.0, integer=True)

STRATEGIES: dict[str, StrategySpec] = {
    "fedavg": StrategySpec("FedAvg", "FedAvg"),
    "fedavgm": StrategySpec("FedAvgM", "FedAvgM", {"server_learning_rate": _POSITIVE, "server_momentum": _UNIT}),
    "fedprox": StrategySpec("FedProx", "FedProx", {"proximal_mu": Param(0.0)}),
    "fedadam": StrategySpec("FedAdam", "FedAdam", dict(_OPT)),
    "fedyogi": StrategySpec("FedYogi", "FedYogi", dict(_OPT)),
    "fedadagrad": StrategySpec("FedAdagrad", "FedAdagrad", {"eta": _POSITIVE, "tau": _POSITIVE}),
    "fedmedian": StrategySpec("FedMedian", "FedMedian"),
    "fedtrimmedavg": StrategySpec("FedTrimmedAvg", "FedTrimmedAvg", {"beta": Param(0.0, 0.5)}),
    "krum": StrategySpec("Krum", "Krum", {"num_malicious_nodes": _MALICIOUS}, _krum_sites),
    "multikrum": StrategySpec("MultiKrum", "MultiKrum", {"num_malicious_nodes": _MALICIOUS,
                                                         "num_nodes_to_select": Param(1.0, integer=True)}, _krum_sites),
    "bulyan": StrategySpec("Bulyan", "Bulyan", {"num_malicious_nodes": _MALICIOUS}, _bulyan_sites),
}
"""Every `sites.strategy` name, in the order the docs list them."""

STRATEGY_NAMES = {name: spec.title for name, spec in STRATEGIES.items()}
"""Each `sites.strategy` as its papers write it."""


def strategy_param_problems(strategy: str, params: dict[str, float]) -> list[str]:
    """Each parameter the strategy does not take, or takes with another value, named as the
    recipe's field `strategy_params.<name>`."""
    spec = STRATEGIES[strategy]
    problems = []
    for name, value in params.items():
        if name not in spec.params:
            takes = (f"it takes {', '.join(spec.params)}" if spec.params else "it takes none")
            problems.append(f"strategy_params.{name}: {strategy} has no parameter {name!r}; {takes}")
        elif (why := spec.params[name].problem(value)) is not None:
            problems.append(f"strategy_params.{name}: {why} for {strategy} (is {value:g})")
    return problems


def strategy_site_problem(strategy: str, params: dict[str, float], n_sites: int) -> str | None:
    """Why `n_sites` replies per round are too few for the strategy with these parameters."""
    spec = STRATEGIES[strategy]
    if spec.sites_needed is None:
        return None
    need, rule = spec.sites_needed(params)
    if n_sites >= need:
        return None
    return (f"sites.strategy {strategy} with these strategy_params needs at least {need} sites per round and "
            f"a round here may aggregate {n_sites} ({rule}); lower strategy_params.num_malicious_nodes"
            f"{' or num_nodes_to_select' if 'num_nodes_to_select' in spec.params else ''}, or choose another strategy")
