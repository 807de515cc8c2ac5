import pytest

from megatron_moevement.harness.layout import LayoutError, ParallelLayout


@pytest.mark.parametrize(
    "text,expected",
    [
        ("single", ParallelLayout()),
        ("ep2", ParallelLayout(dp=2, ep=2)),
        ("pp2", ParallelLayout(pp=2)),
        ("pp2xdp2xep2", ParallelLayout(pp=2, dp=2, ep=2)),
        ("PP2 x DP4 x EP2", ParallelLayout(pp=2, dp=4, ep=2)),
    ],
)
def test_parse(text, expected):
    assert ParallelLayout.parse(text) == expected


def test_world_size_and_expert_dp():
    layout = ParallelLayout(pp=2, dp=4, ep=2)
    assert layout.world_size == 8
    assert layout.expert_dp == 2


@pytest.mark.parametrize("kwargs", [dict(pp=0), dict(dp=-1), dict(ep=3, dp=2), dict(tp="2")])
def test_invalid_layouts_name_the_problem(kwargs):
    with pytest.raises(LayoutError) as err:
        ParallelLayout(**kwargs)
    assert any(k in str(err.value) for k in kwargs)


def test_parse_rejects_garbage():
    with pytest.raises(LayoutError, match="pp2xdp2xep2"):
        ParallelLayout.parse("pipeline2")
