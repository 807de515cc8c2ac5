"""The local multi-process harness: real Megatron-Core MoE training on CPU/gloo.

Library code reused by the tests, benchmarks and the demo: parallel layouts, a small MoE
``GPTModel``, addressable synthetic data, the per-rank trainer, and a pid-tracking launcher.
"""

from megatron_moevement.harness.layout import LayoutError, ParallelLayout
from megatron_moevement.harness.model import TinyMoEConfig

__all__ = ["LayoutError", "ParallelLayout", "TinyMoEConfig"]
