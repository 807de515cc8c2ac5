"""Install megatron-moevement.

The core pins are exact because the CPU harness and the Megatron-Core glue are tested against
these releases: ``torch==2.13.0`` (a bare ``torch`` would pull multi-GB CUDA wheels on a CPU
machine) and ``megatron-core==0.16.1`` (the newest release that installs on Python 3.11).
"""

from setuptools import find_packages, setup

setup(
    name="megatron-moevement",
    version="0.1.0",
    description=(
        "MoEvement for Megatron-Core: in-memory sparse checkpointing, sparse-to-dense "
        "reconstruction and localized recovery for Mixture-of-Experts training"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_moevement", "megatron_moevement.*"]),
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "psutil",
        "numpy",
        # Hardware CRC32C for snapshot checksums that releases the GIL while it hashes (LGPL-2.1,
        # used unmodified as a library; ~15 GB/s here, 3.5x zlib.crc32). google-crc32c computes
        # the same values and is used when only it is installed, but holds the GIL.
        "crc32c",
    ],
    extras_require={
        # Transformer Engine needs CUDA headers to build its torch extension; optional.
        "te": ["transformer-engine"],
        "sim": ["matplotlib"],
        "test": ["pytest", "pytest-timeout", "matplotlib"],
        # What Megatron-LM's own training scripts (pretrain_gpt.py, megatron.training) import
        # beyond megatron-core; pybind11 builds its dataset helpers.
        "megatron-lm": ["six", "regex", "pyyaml", "pydantic", "pybind11"],
    },
    entry_points={
        "console_scripts": [
            "moevement-train=megatron_moevement.cli:main",
            "moevement-sim=megatron_moevement.sim.cli:main",
            "moevement-convert=megatron_moevement.convert:main",
        ],
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
    ],
)
