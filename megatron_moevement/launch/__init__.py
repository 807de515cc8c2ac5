"""Starting local jobs: processes per rank (and spares), always cleaned up by pid.

* :mod:`.local`: :class:`~.local.LocalJob` and the :class:`~.local.ElasticAgent` that runs the
  job coordinator on it.
"""
