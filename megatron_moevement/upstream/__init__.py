"""Upstream logging: what a pipeline stage sends, kept in host memory for its neighbours.

* :mod:`.log`: :class:`~.log.UpstreamLog`, entries tagged (direction, iteration, microbatch);
* :mod:`.communicator`: the logging p2p communicator handed to Megatron's schedule.
"""
