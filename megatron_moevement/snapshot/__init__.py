"""Capturing sparse checkpoints into host memory and replicating them to peers.

* :mod:`.slots`: what a checkpoint is (slots of packed host buffers, manifests);
* :mod:`.buffers`: pinned host buffers, allocated once per (window parity, slot);
* :mod:`.engine`: the asynchronous device-to-host copier (copy stream and events on CUDA, a
  background thread on CPU);
* :mod:`.sharding`: which data-parallel replica captures which operator;
* :mod:`.replication`: the peers' copies, and which windows are persisted;
* :mod:`.checksum`: raw-byte identity of tensors (checksums, dtype names);
* :mod:`.transport`: point-to-point transfer of bytes and slots.
"""
