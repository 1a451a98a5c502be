"""Tables keyed by call signature (every shape, stride, dtype and option a call derives from), for
the kernels' launch arguments and the public functions' plans. Plain Python, no Triton: the
dispatch layer imports it on machines without Triton too."""

from __future__ import annotations


class SignatureTable(dict):
    """Values by call signature (a launch's arguments, a call's plan). A model's layers repeat a
    few signatures, so what a signature derives is derived once; bounded: a workload of many
    shapes starts over rather than growing."""

    def __init__(self, limit: int = 512):
        super().__init__()
        self.limit = limit

    def keep(self, key, value):
        """Store ``value`` under ``key`` (emptying a full table first); returns ``value``. A key
        that cannot be hashed (an option or config of a mutable type) is not stored."""
        if len(self) >= self.limit:
            self.clear()
        try:
            self[key] = value
        except TypeError:
            pass
        return value

    def find(self, key):
        """The value under ``key``, or None: for a None key, one not kept, or one that cannot be
        hashed."""
        if key is None:
            return None
        try:
            return self.get(key)
        except TypeError:
            return None


__all__ = ["SignatureTable"]
