"""The feature scalings and the argument errors of the linear probe's grid script."""

import numpy as np
import pytest

from experiments.results import linear_lr_grid


def test_l2_scaling_gives_unit_rows():
    features = np.random.default_rng(0).normal(size=(20, 8)) * 5.0
    scaled = linear_lr_grid.scale(features, "l2", features)
    np.testing.assert_allclose(np.linalg.norm(scaled, axis=1), 1.0, rtol=1e-12)


def test_std_scaling_uses_reference_statistics():
    rng = np.random.default_rng(1)
    reference = rng.normal(loc=3.0, scale=2.0, size=(500, 4))
    scaled = linear_lr_grid.scale(reference, "std", reference)
    np.testing.assert_allclose(scaled.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(scaled.std(0), 1.0, rtol=1e-5)
    other = linear_lr_grid.scale(reference[:10] + 1.0, "std", reference)
    np.testing.assert_allclose(other, scaled[:10] + 1.0 / (reference.std(0) + 1e-6))


def test_none_scaling_is_identity():
    features = np.arange(6.0).reshape(2, 3)
    assert linear_lr_grid.scale(features, "none", features) is features


@pytest.mark.parametrize("flags, message", [
    (["--scalings=l3"], "unknown scaling 'l3'"),
    (["--learning_rates=1,x"], "invalid --learning_rates '1,x'"),
])
def test_invalid_flags_fail_before_jax(tmp_path, capsys, flags, message):
    assert linear_lr_grid.main([f"--workdir={tmp_path}", *flags]) == 1
    assert message in capsys.readouterr().err
