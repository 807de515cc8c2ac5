"""Small stand-ins for the scheduler and operator registry, for unit tests of the snapshot,
replay and durable-file code that need only their shape."""


class FakeSchedule:
    """A schedule with fixed ``slices`` (one per slot)."""

    def __init__(self, slices):
        self.slices = slices
        self.window_size = len(slices)

    def to_dict(self):
        return {"slices": self.slices}


class FakeRegistry:
    """An operator registry over a fixed list of operators."""

    def __init__(self, ops):
        self.operators = ops
        self._by_name = {op.name: op for op in ops}

    def refresh(self):
        pass

    def __getitem__(self, name):
        return self._by_name[name]
