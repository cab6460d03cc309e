"""A routing hook: a component the Router consults, independent of its RoutingConfig, to see or replace
the experts it chose.

In every forward that has a routing key (moetrain.moe.routing_noise: training, evaluation), the router hands
its hook the layer, the global position of the forward's first token and its own [S, k] choice, and routes
with the [S, k] choice the hook returns: the same one (a recorder, which keeps it) or another (a replay,
which returns what was recorded for those positions). The routing weights still come from the router's
scores for whichever experts are chosen, so gradients flow as usual. Positions come from the routing key,
the same whatever the data, tensor, expert or pipeline layout: a record made under one layout replays under
any other. The hook runs on the device without a host sync (the position is a tensor).
"""

from __future__ import annotations

from torch import Tensor


class RoutingHook:
    """The identity: override `route` to record or replace choices."""

    def route(self, layer: int, first_position: Tensor, chosen: Tensor, training: bool) -> Tensor:
        """The [S, k] int64 experts to route the S tokens at global positions `first_position` (a 0-d int64
        tensor) + 0..S-1 of MoE layer `layer` to, given the router's own `chosen`."""
        return chosen
