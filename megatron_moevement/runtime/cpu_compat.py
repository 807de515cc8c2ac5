"""CPU/gloo support for Megatron-Core 0.16.1: the only place this package patches Megatron.

Megatron-Core assumes CUDA throughout: ``device="cuda"`` literals, ``torch.cuda.current_device()``
as a device argument, CUDA streams and events, and a CUDA RNG tracker. None of that is needed for
the *semantics* of training, so on a machine without CUDA :func:`apply_cpu_compat` redirects these
code paths to the CPU. Each redirection below carries a one-line reason. Nothing is applied when
CUDA is available: on GPUs Megatron runs unmodified.

The redirections are:

* :class:`CudaToCpuDeviceMode` (a ``TorchFunctionMode``) rewrites CUDA device arguments of tensor
  factories and ``Tensor.cuda``/``Tensor.to`` to the CPU, because more than a hundred call sites in
  Megatron-Core pass ``device="cuda"`` or ``torch.cuda.current_device()``.
* ``torch.cuda`` stream/event/synchronize/current_device shims, because the all-to-all dispatcher,
  DDP and p2p layer call them unconditionally.
* :class:`CpuRNGStatesTracker`, because Megatron's tracker forks CUDA generator states.
* the all-to-all dispatcher's device-to-host step, because on CPU the split sizes stay tensors and
  gloo's ``all_to_all_single`` needs them as host sequences.
* ``te_general_gemm`` defined as ``None`` in ``moe_utils`` when Transformer Engine is absent.
* ``Tensor.type()`` seen from ``megatron.core.optimizer``, whose classes check parameters against
  ``torch.cuda.*Tensor`` names.
* a grouped GEMM for ``GroupedMLP`` (``grouped_gemm_util.ops.gmm``), because the
  ``grouped_gemm`` package is a CUDA extension.
* the local layer spec's torch norm (``WrappedTorchNorm``) with sequence parallelism, because it
  asserts SP off (apex's FusedLayerNorm, which allows it, needs CUDA) while MoE with TP needs SP.
* uneven sequence-parallel gathers and reduce-scatters (``tensor_parallel.mappings``), because
  gloo's ``all_gather`` / ``reduce_scatter`` need equal sizes on every rank; the all-to-all
  dispatcher with expert tensor parallelism gathers uneven token counts.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megatron_moevement.logging_utils import get_logger

logger = get_logger(__name__)

_APPLIED = False
_LOCK = threading.Lock()
_OPTIMIZER_PACKAGE = "megatron.core.optimizer"


def _is_cuda_device(device: Any) -> bool:
    """True for every spelling of a CUDA device: "cuda", "cuda:0", 0, torch.device("cuda")."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # An integer device index means a CUDA ordinal in Megatron's call sites.
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class CudaToCpuDeviceMode(TorchFunctionMode):
    """Redirects CUDA placements requested by Megatron-Core to the CPU.

    Reason: Megatron-Core 0.16.1 hard-codes CUDA placements in ~100 call sites (buffers, optimizer
    scalars, p2p shape tensors, schedules); rewriting the device at the torch API boundary keeps
    the library code itself untouched.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            result = func(*args)
            if _called_from(_OPTIMIZER_PACKAGE) and result.startswith("torch."):
                # The optimizers check param.type() against 'torch.cuda.*Tensor' names.
                return result.replace("torch.", "torch.cuda.", 1)
            return result
        return func(*args, **kwargs)


def _called_from(module_name: str, depth: int = 4) -> bool:
    """True if one of the ``depth`` callers of the redirected function is in ``module_name``."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if str(frame.f_globals.get("__name__", "")).startswith(module_name):
            return True
        frame = frame.f_back
    return False


class _HostStream:
    """Stand-in for ``torch.cuda.Stream`` on CPU: work is synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs) -> None:
        del args, kwargs

    def wait_stream(self, stream: Any) -> None:
        del stream

    def wait_event(self, event: Any) -> None:
        del event

    def record_event(self, event: Any = None) -> "_HostEvent":
        return event if event is not None else _HostEvent()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _HostStream)

    def __hash__(self) -> int:
        return 0


class _HostEvent:
    """Stand-in for ``torch.cuda.Event`` on CPU: every event is complete when recorded."""

    def __init__(self, *args, **kwargs) -> None:
        del args, kwargs

    def record(self, stream: Any = None) -> None:
        del stream

    def wait(self, stream: Any = None) -> None:
        del stream

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_HOST_STREAM = _HostStream()


def _patch_torch_cuda() -> None:
    # Reason: the dispatcher, DDP and the p2p layer call these unconditionally; on CPU all work is
    # synchronous, so a single host "stream" with always-complete events is exact.
    cuda = torch.cuda
    cuda.Stream = _HostStream  # type: ignore[assignment,misc]
    cuda.Event = _HostEvent  # type: ignore[assignment,misc]
    cuda.current_stream = lambda device=None: _HOST_STREAM  # type: ignore[assignment]
    cuda.default_stream = lambda device=None: _HOST_STREAM  # type: ignore[assignment]
    cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment]
    cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    # current_device() is passed straight to ``device=`` (also inside autograd backward, where
    # no torch-function mode is active), so it must name the CPU itself.
    cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    cuda.set_device = lambda device: None  # type: ignore[assignment]
    cuda.empty_cache = lambda: None  # type: ignore[assignment]
    cuda.memory_allocated = lambda device=None: 0  # type: ignore[assignment]
    cuda.max_memory_allocated = lambda device=None: 0  # type: ignore[assignment]
    cuda.memory_reserved = lambda device=None: 0  # type: ignore[assignment]
    cuda.max_memory_reserved = lambda device=None: 0  # type: ignore[assignment]
    cuda.reset_peak_memory_stats = lambda device=None: None  # type: ignore[assignment]
    cuda.memory_stats = lambda device=None: {}  # type: ignore[assignment]
    # Megatron saves and restores the "CUDA" generator next to the CPU one (rerun state machine,
    # checkpoints); on CPU the ops draw from the CPU generator, so that is the one it gets.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)  # type: ignore
    cuda.get_rng_state_all = lambda: [torch.get_rng_state()]  # type: ignore[assignment]
    cuda.set_rng_state_all = lambda states: torch.set_rng_state(states[0])  # type: ignore


class CpuRNGStatesTracker:
    """Megatron's named RNG-state tracker, backed by the CPU default generator.

    Reason: Megatron's ``CudaRNGStatesTracker`` forks CUDA generator states; on CPU the ops that
    consume randomness (dropout, init) draw from the CPU generator, so that is what must be forked.
    The API (``add``/``fork``/``get_states``/``set_states``/``reset``) matches Megatron's.
    """

    def __init__(self, *args, **kwargs) -> None:
        del args, kwargs
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._current_state_name = "default-rng"

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"RNG seed {seed} is already tracked; seeds must be unique")
        if name in self.states_:
            raise RuntimeError(f"RNG state {name!r} already exists")
        self.seeds_.add(seed)
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} is not tracked; call add() first")
        original = torch.get_rng_state()
        previous_name = self._current_state_name
        if previous_name != "default-rng":
            self.states_[previous_name] = original
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if previous_name != "default-rng":
                original = self.states_[previous_name]
            torch.set_rng_state(original)
            self._current_state_name = previous_name


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs) -> None:
        del args, kwargs
        if mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED and not force_reset:
            return
        mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    # Reason: Megatron's tracker reads and writes CUDA generator states.
    mrandom.initialize_rng_tracker = initialize_rng_tracker
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_moe() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        # Reason: moe_utils references te_general_gemm unguarded when Transformer Engine is absent.
        moe_utils.te_general_gemm = None

    def _host_dtoh_and_synchronize(self, point: str, tokens_per_expert=None):
        # Reason: on CPU the split sizes are already host tensors, but gloo's all_to_all_single
        # needs them as host sequences (the CUDA path turns them into numpy arrays here).
        if self.drop_and_pad or point != self.cuda_dtoh_point:
            return tokens_per_expert
        for attr in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, attr, None)
            if torch.is_tensor(value):
                setattr(self, attr, value.numpy())
        return tokens_per_expert

    token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = (
        _host_dtoh_and_synchronize
    )


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, batch_sizes, trans_b: bool = False):
    """``out[rows of expert e] = a[rows of expert e] @ b[e]`` (``b[e].T`` with ``trans_b``), the
    contract of ``grouped_gemm.ops.gmm``: ``a`` is [tokens, k] grouped by expert in order,
    ``b`` is [experts, k, n] (or [experts, n, k]), ``batch_sizes`` the tokens per expert.

    One matmul per expert with autograd through torch's own ops: deterministic on CPU, and the
    same arithmetic as the per-expert ``SequentialMLP``.
    """
    sizes = [
        int(s) for s in (batch_sizes.tolist() if torch.is_tensor(batch_sizes) else batch_sizes)
    ]
    chunks = torch.split(a, sizes, dim=0)
    outs = [c @ (b[e].t() if trans_b else b[e]) for e, c in enumerate(chunks)]
    return torch.cat(outs, dim=0) if outs else a.new_empty((0, b.shape[1 if trans_b else 2]))


class _CpuGroupedGemm:
    """What ``grouped_gemm_util`` expects of the ``grouped_gemm`` package (its ``ops.gmm``)."""

    class ops:  # noqa: N801 - mirrors the package's attribute
        gmm = staticmethod(grouped_gemm)


def _patch_grouped_gemm() -> None:
    from megatron.core.transformer.moe import grouped_gemm_util

    if grouped_gemm_util.grouped_gemm is None:
        # Reason: the grouped_gemm package is a CUDA extension; GroupedMLP needs its gmm.
        grouped_gemm_util.grouped_gemm = _CpuGroupedGemm
        grouped_gemm_util.ops = _CpuGroupedGemm.ops


def _patch_torch_norm() -> None:
    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, *args, **kwargs):
        # Reason: WrappedTorchNorm asserts sequence parallelism off; a torch norm is exact under
        # SP when its parameters say so (finalize_model_grads all-reduces their gradients over
        # the tensor-parallel group, which is what the sharded sequence needs).
        sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        if sequence_parallel:
            config.sequence_parallel = False
            try:
                norm = original(cls, config, hidden_size, *args, **kwargs)
            finally:
                config.sequence_parallel = True
            for param in norm.parameters():
                setattr(param, "sequence_parallel", True)
            return norm
        return original(cls, config, hidden_size, *args, **kwargs)

    torch_norm.WrappedTorchNorm.__new__ = __new__


def _patch_uneven_sequence_parallel() -> None:
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = (
        mappings._gather_along_first_dim,
        mappings._reduce_scatter_along_first_dim,
    )

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        # Reason: gloo's all_gather needs equal sizes; pad to the largest, gather, cut (exact).
        if output_split_sizes is None or len(set(output_split_sizes)) <= 1 or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        largest = max(output_split_sizes)
        padded = input_.new_zeros((largest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in range(group.size())]
        dist.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(pieces, output_split_sizes)], dim=0)

    def _reduce_scatter_along_first_dim(
        input_, group, input_split_sizes=None, use_global_buffer=False
    ):
        # Reason: gloo's reduce_scatter needs equal sizes; all-reduce the whole input, keep ours.
        if input_split_sizes is None or len(set(input_split_sizes)) <= 1 or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return total[start : start + input_split_sizes[group.rank()]].clone()

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


_DEVICE_MODE: CudaToCpuDeviceMode | None = None


_BATCH_INVARIANT_KERNELS = "megatron.core.transformer.custom_layers.batch_invariant_kernels"


def _batch_invariant_mode_unavailable(*args, **kwargs):
    raise RuntimeError(
        "--batch-invariant-mode needs Megatron's Triton kernels, which need CUDA; run without it "
        "on CPU"
    )


def apply_megatron_lm_cpu_compat() -> bool:
    """The redirections Megatron-LM's training loop (``megatron.training``, ``pretrain_gpt.py``)
    needs on CPU, on top of :func:`apply_cpu_compat`. Call before ``megatron.training`` is
    imported, once the Megatron-LM tree is on ``sys.path``. A no-op when CUDA is available.

    Returns:
        True if the redirections are active in this process.
    """
    if not apply_cpu_compat():
        return False
    import importlib.util
    import types

    if _BATCH_INVARIANT_KERNELS not in sys.modules and importlib.util.find_spec("triton") is None:
        # Reason: megatron.training.initialize imports these Triton kernels unconditionally;
        # they run only in --batch-invariant-mode, which needs CUDA. The one name it imports
        # refuses clearly if that mode is asked for.
        module = types.ModuleType(_BATCH_INVARIANT_KERNELS)
        module.enable_batch_invariant_mode = _batch_invariant_mode_unavailable
        sys.modules[_BATCH_INVARIANT_KERNELS] = module
    from megatron.legacy import fused_kernels
    from megatron.training import arguments, initialize, training, utils

    # Reason: pretrain() never passes allow_no_cuda, and initialize_megatron asserts CUDA.
    original_init = initialize.initialize_megatron

    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original_init(*args, **kwargs)

    initialize.initialize_megatron = initialize_megatron
    training.initialize_megatron = initialize_megatron

    # Reason: with torch.cuda.device_count() == 0 Megatron-LM builds no model-parallel groups
    # and never seeds its RNG tracker; on CPU the one "device" is the host.
    for fn_name in ("_initialize_distributed", "_set_random_seed"):
        original = getattr(initialize, fn_name)

        def with_one_device(*args, __original=original, **kwargs):
            count = torch.cuda.device_count
            torch.cuda.device_count = lambda: 1
            try:
                return __original(*args, **kwargs)
            finally:
                torch.cuda.device_count = count

        setattr(initialize, fn_name, with_one_device)
    # Reason: the legacy fused kernels are CUDA code compiled with nvcc; on CPU the unfused
    # softmax path runs (--no-masked-softmax-fusion).
    fused_kernels.load = lambda args: None
    # Reason: the GPU architecture is read to pick fused kernels; none is used on CPU.
    utils.get_device_arch_version = arguments.get_device_arch_version = lambda: 0
    logger.debug("Megatron-LM CPU redirections applied")
    return True


def cpu_compat_needed() -> bool:
    """True when CUDA is unavailable, i.e. when Megatron-Core needs the CPU redirections."""
    return not torch.cuda.is_available()


def outside_device_mode():
    """A context in which the device-redirect mode does not intercept torch calls (a no-op
    context where the CPU redirections are not applied, e.g. on CUDA).

    For this package's own hot paths that only read tensors and make views of them (the
    snapshot slot's walk over a few hundred tensors every iteration): there is no CUDA placement
    to redirect there, and the mode's Python ``__torch_function__`` around every ``shape``,
    ``dtype`` and ``detach`` made that walk ~10x slower on the training thread.
    """
    if _DEVICE_MODE is None:
        return contextlib.nullcontext()
    return torch._C.DisableTorchFunction()


def device_mode_for_thread():
    """The device-redirect mode for a thread other than the one :func:`apply_cpu_compat` ran on
    (torch function modes are per thread), as a context; a no-op context where the CPU
    redirections are not applied (e.g. on CUDA). For work that runs Megatron-Core code off the
    main thread (the spare's warm-up)."""
    if _DEVICE_MODE is None:
        return contextlib.nullcontext()
    return CudaToCpuDeviceMode()


def apply_cpu_compat() -> bool:
    """Applies the CPU redirections once per process (a no-op when CUDA is available).

    The device-redirect mode is entered on the calling thread and stays active for the life of the
    process; call this from the thread that runs Megatron-Core (the main thread of a worker).

    Returns:
        True if the redirections are active in this process.
    """
    global _APPLIED, _DEVICE_MODE
    if not cpu_compat_needed():
        return False
    with _LOCK:
        if _APPLIED:
            return True
        _patch_torch_cuda()
        _patch_rng_tracker()
        _patch_moe()
        _patch_grouped_gemm()
        _patch_torch_norm()
        _patch_uneven_sequence_parallel()
        _DEVICE_MODE = CudaToCpuDeviceMode()
        _DEVICE_MODE.__enter__()
        _APPLIED = True
    logger.debug("Megatron-Core CPU redirections applied")
    return True
