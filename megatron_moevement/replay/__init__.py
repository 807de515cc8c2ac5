"""Sparse-to-dense conversion: rolling back to a checkpoint and replaying it bit-exactly.

* :mod:`.scalar_log`: the optimizer scalars (grad norm, skip decision, learning rates, loss
  scaler) of the original run, logged per iteration;
* :mod:`.loader`: loading a slot into the live model and optimizer;
* :mod:`.frozen`: frozen/active execution and the replayed optimizer step;
* :mod:`.engine`: :class:`~.engine.ReplayEngine` and its :class:`~.engine.ReplayReport`.
"""
