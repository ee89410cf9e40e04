import pytest

from lightning_intrafusion.schedule import (
    ConstantSchedule, CubicSchedule, ExplicitSchedule, ExponentialSchedule, LinearSchedule, check_monotone,
    resolve_schedule,
)


def test_linear_cubic_exponential_constant_values():
    assert [LinearSchedule(0.8)(i, 4) for i in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    # AGP: s_t = s_f (1 - (1 - t)^3)
    assert [CubicSchedule(0.8)(i, 4) for i in range(4)] == pytest.approx([0.8 * (1 - 0.75 ** 3), 0.8 * (1 - 0.5 ** 3), 0.8 * (1 - 0.25 ** 3), 0.8])
    keep = [1 - ExponentialSchedule(0.75)(i, 2) for i in range(2)]
    assert keep == pytest.approx([0.5, 0.25])  # equal relative steps
    assert [ConstantSchedule(0.5)(i, 3) for i in range(3)] == [0.5, 0.5, 0.5]


def test_explicit_and_callable_schedules():
    s = resolve_schedule({0: 0.1, 2: 0.5}, 0.5)
    assert [s(i, 4) for i in range(4)] == [0.1, 0.1, 0.5, 0.5]
    f = resolve_schedule(lambda i, n: 0.1 * (i + 1), 0.3)
    assert check_monotone(f, 3) == pytest.approx([0.1, 0.2, 0.3])


def test_schedules_reach_target_and_rise_monotonically():
    for cls in (LinearSchedule, CubicSchedule, ExponentialSchedule, ConstantSchedule):
        values = check_monotone(cls(0.7), 5)
        assert values[-1] == pytest.approx(0.7)


@pytest.mark.parametrize("bad", [1.0, -0.2, "0.5"])
def test_bad_targets(bad):
    with pytest.raises(ValueError, match="target sparsity"):
        LinearSchedule(bad)


def test_bad_schedules():
    with pytest.raises(ValueError, match="Unknown schedule"):
        resolve_schedule("zigzag", 0.5)
    with pytest.raises(ValueError, match="decreases"):
        check_monotone(lambda i, n: 0.5 - 0.1 * i, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        check_monotone(lambda i, n: 1.2, 2)
    with pytest.raises(ValueError, match="at least one"):
        ExplicitSchedule({})
