"""Runtime support: the CPU/gloo redirections for Megatron-Core and process-group helpers.

This subpackage is the only place that patches Megatron-Core; see :mod:`.cpu_compat`.
"""

from megatron_moevement.runtime.cpu_compat import apply_cpu_compat, cpu_compat_needed


def ensure_runtime() -> bool:
    """Prepares this process to run Megatron-Core; returns True if CPU redirections are active."""
    return apply_cpu_compat()


__all__ = ["apply_cpu_compat", "cpu_compat_needed", "ensure_runtime"]
