"""Surviving lost ranks: detection, spares, scoped rollback and replay.

* :mod:`.protocol`: the job store's keys, a rank's place across process-group generations,
  its heartbeat (the workers' side);
* :mod:`.coordinator`: the agent's side (process table, spares, generations, silent ranks);
* :mod:`.scope`: which ranks roll back (the failed stages' data-parallel groups);
* :mod:`.tiers`: the recovery plan, a pure function of what survived;
* :mod:`.exchange`: the transfers a plan needs (checkpoints, scalar log, upstream logs);
* :mod:`.replay_comm`: the p2p communicator of a scoped replay;
* :mod:`.live_state`: host copies of a rank's live state across the rebuild, its fingerprint;
* :mod:`.driver`: :class:`~.driver.RecoveryDriver` and the :class:`~.driver.Trainer` protocol it
  drives.
"""
