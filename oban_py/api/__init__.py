"""The facade's method groups: mixins of :class:`~oban_py.Oban`, one module per concern.

``Oban`` keeps construction, lifecycle and inserting; job control (:mod:`.jobs`) and queue control
(:mod:`.queues`) live here, each written against :class:`EngineBase`: what a group may use of the
instance (its driver, its node, its config, its events).
"""
