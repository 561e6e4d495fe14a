"""`--strategy round_robin` and `random` on Ray Serve, as Ray request routers.

Ray Serve's default router sends each request to the less busy of two random replicas (power of two
choices), which is dgrun's `least_busy`; the other two strategies are these routers, which Ray imports by
path in its proxies (`dgrun.serve.ray_routing:RoundRobinRouter`).
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from ray.serve.request_router import FIFOMixin, RequestRouter

ROUTERS = {
    "round_robin": "dgrun.serve.ray_routing:RoundRobinRouter",
    "random": "dgrun.serve.ray_routing:RandomRouter",
}


class RoundRobinRouter(FIFOMixin, RequestRouter):
    """Each request to the next replica in a fixed order (by replica id)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._turn = itertools.count()

    async def choose_replicas(
        self, candidate_replicas: list[Any], pending_request: Any = None
    ) -> list[list[Any]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda replica: str(replica.replica_id))
        return [[ordered[next(self._turn) % len(ordered)]]]


class RandomRouter(FIFOMixin, RequestRouter):
    """Each request to a replica drawn at random."""

    async def choose_replicas(
        self, candidate_replicas: list[Any], pending_request: Any = None
    ) -> list[list[Any]]:
        return [[random.choice(candidate_replicas)]] if candidate_replicas else []
