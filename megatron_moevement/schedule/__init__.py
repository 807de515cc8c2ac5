"""What each iteration snapshots: popularity, operator order, Algorithm 1, the window schedule.

* :mod:`.popularity`: router statistics and the ordering policies;
* :mod:`.order`: the snapshot order of the operators (``OrderOperators``);
* :mod:`.window`: Algorithm 1 (window size and slot cut), torch-free and shared with the
  simulator;
* :mod:`.sparse_schedule`: a window's :class:`~.sparse_schedule.SparseSchedule`;
* :mod:`.manager`: the schedule in effect, changed only at window boundaries.
"""
