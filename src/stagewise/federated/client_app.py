"""The one Flower `ClientApp` of stagewise: a site's side of every message, over a site
backend that does the work. In a study's simulation the backend holds the site's partition
in memory and its state between rounds in the SuperNode's `context.state`
(`simulation.InMemorySite`); in a deployment it is a hospital's own manifest, image cache and
state on its own disk (`deployment.DiskSite`). Message unpacking and packing live here only.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from stagewise.federated.secure_aggregation import check_secured, secure_aggregation_mod
from stagewise.federated.wire import packing_mod


class SiteBackend(Protocol):
    arm: object
    """The site's own arm (its recipe's): what it agreed to, e.g. secure aggregation."""

    def greet(self, config) -> dict:
        """Who the site is and which job its recipe makes (a deployment's first message)."""

    def train(self, config, received: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """One round: (tensors to send back, scalar metrics with `num-examples`)."""

    def evaluate(self, config, received: dict[str, torch.Tensor]) -> tuple[list | None, dict]:
        """The final model at the site: (arrays to send back or None, scalar metrics)."""

    def site_model(self, config) -> tuple[dict[str, torch.Tensor], dict]:
        """Cross-site evaluation (opt-in): the site's own model tensors, and scalar metrics."""

    def cross_score(self, config, received: dict[str, torch.Tensor],
                    site_model: dict[str, torch.Tensor]) -> tuple[list | None, dict]:
        """Cross-site evaluation: another site's model scored here, as `evaluate` returns it."""


def make_client_app(site_for: Callable[[object, object], SiteBackend]):
    """A ClientApp whose every message is handled by `site_for(context, config)`."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp(mods=[packing_mod])  # tensors travel packed (wire.py); handlers see them as sent

    @app.query()
    def greet(msg, context):
        config = msg.content["config"]
        return Message(RecordDict({"config": ConfigRecord(site_for(context, config).greet(config))}), reply_to=msg)

    @app.train(mods=[secure_aggregation_mod])  # a SecAgg+ round's messages through Flower's secaggplus_mod
    def train(msg, context):
        config = msg.content["config"]
        site = site_for(context, config)
        check_secured(site.arm, config)  # under secure aggregation, a plain round is refused
        sent, metrics = site.train(config, msg.content["arrays"].to_torch_state_dict())
        return Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=sent), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        config = msg.content["config"]
        arrays, metrics = site_for(context, config).evaluate(config, msg.content["arrays"].to_torch_state_dict())
        content = {"metrics": MetricRecord(metrics)} if arrays is None else {"scores": ArrayRecord(arrays),
                                                                              "metrics": MetricRecord(metrics)}
        return Message(RecordDict(content), reply_to=msg)

    @app.query("site_model")  # cross-site evaluation only (sites.cross_site_evaluation)
    def site_model(msg, context):
        config = msg.content["config"]
        sent, metrics = site_for(context, config).site_model(config)
        return Message(RecordDict({"site_model": ArrayRecord(torch_state_dict=sent), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    @app.evaluate("cross_site")  # cross-site evaluation only: another site's model, scored here
    def cross_site(msg, context):
        config = msg.content["config"]
        arrays, metrics = site_for(context, config).cross_score(
            config, msg.content["arrays"].to_torch_state_dict(), msg.content["site_model"].to_torch_state_dict())
        content = {"metrics": MetricRecord(metrics)} if arrays is None else {"scores": ArrayRecord(arrays),
                                                                              "metrics": MetricRecord(metrics)}
        return Message(RecordDict(content), reply_to=msg)

    return app
