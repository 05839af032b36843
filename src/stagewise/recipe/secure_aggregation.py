"""Secure aggregation of a federated arm (`sites.secure_aggregation`): Flower's SecAgg+.

Each site masks what it sends in a round with random masks that cancel only in the sum over
the sites, so the coordinator learns the sum of the sites' updates and no single one. The
masks are built from keys the sites agree on pairwise, and every site's secrets are split
into Shamir shares among its neighbours, so the sum can still be unmasked when some sites
drop out after sending (as long as each site keeps `reconstruction_threshold` neighbours).

Only a weighted sum can be aggregated this way: FedAvg and FedProx take it as it is, the
server-side optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) step from it; the robust
aggregators need every site's own update and are refused. Values are clipped and quantized
to integers before masking, so the unmasked mean differs from the float mean by at most
`error_bound` (what a round records).
"""

from __future__ import annotations

from pydantic import Field, model_validator
from stagewise.recipe.base import StrictModel

NEEDS_EACH_UPDATE = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
"""Strategies that look at each site's update (a median, a trimmed mean, distances between
updates): under secure aggregation the coordinator has only the sum."""


class SecureAggregationConfig(StrictModel):
    """Flower's SecAgg+ protocol for every training round of a federated arm."""

    num_shares: int | None = Field(None, ge=3)
    """Neighbours each site splits its secrets among, itself included (default: every site of the round)."""
    reconstruction_threshold: int | None = Field(None, ge=2)
    """Shares that rebuild a site's secret: fewer colluding sites learn nothing; default a majority of the shares, at least 2."""
    clipping_range: float = Field(8.0, gt=0)
    """Each masked value (a site's change to a tensor, times its examples / max_weight) is clipped to +-this (Flower's default)."""
    quantization_range: int = Field(2**22, ge=2)
    """Integer levels the clipping range is quantized into before masking (Flower's default 2^22)."""
    max_weight: float = Field(1000.0, gt=0)
    """Training examples that give a site the full quantization range; more still aggregate, clipped sooner (Flower's default)."""

    @model_validator(mode="after")
    def _threshold_below_shares(self) -> "SecureAggregationConfig":
        if self.num_shares is not None and self.reconstruction_threshold is not None \
                and self.reconstruction_threshold >= self.num_shares:
            raise ValueError(f"secure_aggregation.reconstruction_threshold ({self.reconstruction_threshold}) must be "
                             f"below num_shares ({self.num_shares}): Flower's SecAgg+ needs a share to spare")
        return self

    def shares_and_threshold(self, n_sites: int) -> tuple[int, int]:
        """(shares per secret, shares that rebuild one) for a round of `n_sites` sites."""
        shares = min(self.num_shares or n_sites, n_sites)
        return shares, min(self.reconstruction_threshold or max(2, shares // 2 + 1), shares)

    def error_bound(self, n_sites: int, examples: float) -> float:
        """Largest difference per value between the unmasked weighted mean of `n_sites` sites
        with `examples` training examples in all and the float mean, when nothing is clipped:
        each site's stochastic rounding is under one level (2 * clipping_range /
        quantization_range) of its value times examples / max_weight, and the sum is divided
        by the sites' summed weights (examples / max_weight)."""
        level = 2 * self.clipping_range / self.quantization_range
        return n_sites * level * self.max_weight / examples


def secure_aggregation_problems(sites, n_sites: int | None = None) -> list[str]:
    """What a federated arm's `sites` combine with secure aggregation that cannot work, with
    the reason; `n_sites` (the fewest sites a round may aggregate) once the cohort is known."""
    cfg = sites.secure_aggregation
    if cfg is None:
        return []
    problems = []
    if sites.mode != "federated":
        problems.append("sites.secure_aggregation is for a federated arm (sites.mode: federated)")
    if sites.strategy in NEEDS_EACH_UPDATE:
        problems.append(f"sites.secure_aggregation with strategy {sites.strategy}: it needs each site's own update "
                        "and the coordinator sees only their sum; use fedavg, fedprox, fedavgm, fedadam, fedyogi "
                        "or fedadagrad")
    if n_sites is not None:
        if n_sites < 2:
            problems.append(f"sites.secure_aggregation: a round may aggregate {n_sites} site, and the sum of one "
                            "site's update is that update; it needs at least 2 sites per round (sites.min_sites)")
        if n_sites * cfg.quantization_range >= 2**32:
            problems.append(f"sites.secure_aggregation.quantization_range ({cfg.quantization_range}) times the "
                            f"{n_sites} sites of a round must stay below 2^32, the modulus the masks are added in "
                            "(the sum would wrap around); lower it")
        for name in ("num_shares", "reconstruction_threshold"):
            value = getattr(cfg, name)
            if value is not None and value > n_sites:
                problems.append(f"sites.secure_aggregation.{name} is {value} and a round may have only {n_sites} "
                                "sites to share among; lower it")
    return problems


def secure_aggregation_text(settings: dict | bool | None) -> str:
    """The arm's secure aggregation in words, from `sites.secure_aggregation` as recipe.yaml
    holds it (empty without): the protocol, its settings, and what the coordinator saw."""
    if settings is None or settings is False:
        return ""
    cfg = SecureAggregationConfig.model_validate({} if settings is True else settings)
    shares = f"{cfg.num_shares} shares" if cfg.num_shares else "shares among every site of a round"
    threshold = (f"{cfg.reconstruction_threshold} rebuild a secret" if cfg.reconstruction_threshold
                 else "a majority rebuild a secret")
    return (f"; secure aggregation (Flower's SecAgg+: {shares}, {threshold}; each site's change, times its "
            f"training images / max_weight {cfg.max_weight:g}, clipped to +-{cfg.clipping_range:g} and quantized to "
            f"{cfg.quantization_range} levels): the coordinator received no site's model update, only their masked "
            "sum (each site's training loss and number of images still per site)")
