"""What a scenario test gets from the ``scenario`` fixture."""

from __future__ import annotations

from dataclasses import dataclass

from oban_py import Oban

from .checks import Db
from .cluster import Cluster
from .pgserver import FaultServer


@dataclass
class Scenario:
    server: FaultServer
    cluster: Cluster
    #: An inserting/controlling client (no queues) on the scenario's schema, connected directly.
    client: Oban
    #: Assertion queries (``$p`` is the schema), reconnecting across server restarts.
    db: Db
    prefix: str

    def context(self) -> str:
        """Runner output tails, for assertion messages."""
        return self.cluster.tails()
