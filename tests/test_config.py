"""Tests for MoEvementConfig validation and (de)serialization."""

import dataclasses
import json
import math
import pathlib

import pytest

from megatron_moevement.config import MoEvementConfig, MoEvementConfigError
from megatron_moevement.constants import CHECKSUM_ALGORITHMS, ORDERING_POLICIES


def test_defaults_match_the_paper():
    cfg = MoEvementConfig()
    assert cfg.window_size == "auto" and cfg.auto_window
    assert cfg.ordering == "hard_count"
    assert cfg.reorder_threshold == 0.10
    assert cfg.reorder_fraction == 0.25
    assert cfg.replication_factor == 1
    assert cfg.upstream_logging is True
    assert cfg.checksum == "crc32c"
    assert cfg.snapshot_async is True
    assert cfg.durable_dir is None and cfg.durable_interval is None


# (field, bad value, extra keyword arguments needed to isolate the field)
INVALID = [
    ("window_size", 0, {}),
    ("window_size", -3, {}),
    ("window_size", "fixed", {}),
    ("window_size", 2.5, {}),
    ("window_size", True, {}),
    ("window_size", None, {}),
    ("ordering", "random", {}),
    ("ordering", 3, {}),
    ("ema_decay", 0.0, {}),
    ("ema_decay", 1.0, {}),
    ("ema_decay", -0.5, {}),
    ("ema_decay", math.nan, {}),
    ("ema_decay", "0.9", {}),
    ("reorder_threshold", 0.0, {}),
    ("reorder_threshold", -0.1, {}),
    ("reorder_threshold", math.inf, {}),
    ("reorder_threshold", None, {}),
    ("reorder_fraction", 0.0, {}),
    ("reorder_fraction", 1.5, {}),
    ("reorder_fraction", math.nan, {}),
    ("replication_factor", -1, {}),
    ("replication_factor", 1.0, {}),
    ("replication_factor", False, {}),
    ("ranks_per_node", 0, {}),
    ("ranks_per_node", 8.0, {}),
    ("host_memory_budget_bytes", 0, {}),
    ("host_memory_budget_bytes", -10, {}),
    ("host_memory_budget_bytes", 1e9, {}),
    ("d2h_bandwidth_bytes_per_s", 0, {}),
    ("d2h_bandwidth_bytes_per_s", -1e9, {}),
    ("d2h_bandwidth_bytes_per_s", math.inf, {}),
    ("d2h_bandwidth_bytes_per_s", "fast", {}),
    ("iteration_time_s", 0.0, {}),
    ("iteration_time_s", math.nan, {}),
    ("snapshot_budget_fraction", 0.0, {}),
    ("snapshot_budget_fraction", 1.5, {}),
    ("snapshot_budget_fraction", "half", {}),
    ("recovery_scope", "local", {}),
    ("durable_dir", "", {"durable_interval": 10}),
    ("durable_dir", 5, {"durable_interval": 10}),
    ("durable_interval", 0, {"durable_dir": "/tmp/ckpt"}),
    ("durable_interval", 2.5, {"durable_dir": "/tmp/ckpt"}),
    ("durable_interval", None, {"durable_dir": "/tmp/ckpt"}),
    ("durable_interval", 100, {}),  # interval without a directory
    ("upstream_logging", 1, {}),
    ("upstream_logging", "yes", {}),
    ("heartbeat_interval_s", 0, {}),
    ("heartbeat_interval_s", math.inf, {}),
    ("heartbeat_interval_s", "1s", {}),
    ("heartbeat_timeout_s", -1.0, {}),
    ("heartbeat_timeout_s", None, {}),
    ("heartbeat_timeout_s", 2.0, {}),  # not more than twice the 1 s interval
    ("heartbeat_timeout_s", 5.0, {"heartbeat_interval_s": 2.5}),
    ("checksum", "md5", {}),
    ("checksum", None, {}),
    ("snapshot_async", 0, {}),
]


@pytest.mark.parametrize("field_name,value,extra", INVALID)
def test_invalid_values_raise_clear_errors(field_name, value, extra):
    with pytest.raises(MoEvementConfigError) as info:
        MoEvementConfig(**{field_name: value, **extra})
    message = str(info.value)
    assert f"MoEvementConfig.{field_name}=" in message
    assert repr(value) in message
    assert "Fix:" in message
    assert isinstance(info.value, ValueError)


def test_every_field_has_an_invalid_case():
    covered = {name for name, _, _ in INVALID}
    assert covered == {f.name for f in dataclasses.fields(MoEvementConfig)}


def test_valid_values_are_accepted_and_normalized():
    cfg = MoEvementConfig(
        window_size=4,
        ordering="capacity_normalized",
        ema_decay=0.5,
        reorder_threshold=1,
        reorder_fraction=1,
        replication_factor=0,
        ranks_per_node=8,
        host_memory_budget_bytes=2**30,
        d2h_bandwidth_bytes_per_s=25_000_000_000,
        iteration_time_s=2,
        durable_dir=pathlib.Path("/tmp/x"),
        durable_interval=500,
        upstream_logging=False,
        checksum="sha256",
        snapshot_async=False,
    )
    assert cfg.window_size == 4 and not cfg.auto_window
    assert isinstance(cfg.reorder_threshold, float) and isinstance(cfg.iteration_time_s, float)
    assert cfg.durable_dir == "/tmp/x"
    for name in ORDERING_POLICIES:
        assert MoEvementConfig(ordering=name).ordering == name
    for name in CHECKSUM_ALGORITHMS:
        assert MoEvementConfig(checksum=name).checksum == name


def test_round_trip_through_dict_and_json():
    cfg = MoEvementConfig(
        window_size=3, ordering="ema", ema_decay=0.95, durable_dir="/d", durable_interval=7
    )
    data = cfg.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(MoEvementConfig)}
    assert MoEvementConfig.from_dict(data) == cfg
    assert MoEvementConfig.from_dict(json.loads(json.dumps(data))) == cfg
    assert MoEvementConfig.from_dict({}) == MoEvementConfig()


def test_from_dict_rejects_unknown_keys_with_the_valid_ones():
    with pytest.raises(MoEvementConfigError) as info:
        MoEvementConfig.from_dict({"window_sise": 3})
    assert "window_sise" in str(info.value) and "window_size" in str(info.value)
    with pytest.raises(MoEvementConfigError, match="expects a mapping"):
        MoEvementConfig.from_dict([("window_size", 3)])


def test_replace_revalidates():
    with pytest.raises(MoEvementConfigError, match="reorder_fraction"):
        dataclasses.replace(MoEvementConfig(), reorder_fraction=2.0)


def test_heartbeat_defaults_and_error_names_the_interval():
    cfg = MoEvementConfig()
    assert cfg.heartbeat_interval_s == 1.0 and cfg.heartbeat_timeout_s == 10.0
    assert (
        MoEvementConfig(heartbeat_interval_s=0.25, heartbeat_timeout_s=2).heartbeat_timeout_s == 2.0
    )
    with pytest.raises(MoEvementConfigError, match="twice heartbeat_interval_s"):
        MoEvementConfig(heartbeat_interval_s=4, heartbeat_timeout_s=8)
