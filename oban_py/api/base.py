"""What a facade method group may use of its :class:`~oban_py.Oban` instance."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from ..db.driver import Driver
    from ..runtime.events import Events
    from ..runtime.node import Node

__all__ = ["EngineBase"]


class EngineBase:
    """Declares the instance attributes the mixins read; ``Oban`` defines them."""

    if TYPE_CHECKING:
        config: Config
        node: Node | None
        events: Events

        @property
        def driver(self) -> Driver: ...
