"""Tests of the learning-rate schedule, the optimiser and the EMA update."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascl_jax import train_state as state_lib
from ascl_jax.train_step import ema_update


def reference_learning_rate(step, peak, warmup_steps, total_steps):
    """Linear warm-up from 0 over warmup_steps, then cosine from peak to 0 at total_steps."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    if warmup_steps == total_steps:
        return peak
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@pytest.mark.parametrize("warmup_steps,total_steps", [(5, 20), (0, 10), (3, 3)])
def test_schedule_matches_warmup_cosine(warmup_steps, total_steps):
    schedule = state_lib.learning_rate_schedule(
        0.03, warmup_steps=warmup_steps, total_steps=total_steps
    )
    for step in range(total_steps + 2):
        expected = reference_learning_rate(step, 0.03, warmup_steps, total_steps)
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-8)


def test_schedule_starts_at_zero_and_peaks_after_warmup():
    schedule = state_lib.learning_rate_schedule(0.1, warmup_steps=4, total_steps=40)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(4)), 0.1, rtol=1e-6)
    assert float(schedule(40)) == pytest.approx(0.0, abs=1e-9)


def test_optimizer_matches_pytorch_sgd_formula():
    """SGD with coupled weight decay: g += wd * p; buf = m * buf + g; p -= lr * buf."""
    learning_rate, momentum, weight_decay = 0.05, 0.9, 5e-4
    tx = state_lib.make_optimizer(
        lambda step: learning_rate, momentum=momentum, weight_decay=weight_decay
    )
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.ones((2,))}
    opt_state = tx.init(params)
    reference = {key: np.asarray(value, np.float64) for key, value in params.items()}
    buffers = {key: np.zeros_like(value) for key, value in reference.items()}
    for _ in range(4):
        grads = {key: rng.normal(size=value.shape) for key, value in reference.items()}
        updates, opt_state = tx.update(
            jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads), opt_state, params
        )
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for key in reference:
            gradient = grads[key] + weight_decay * reference[key]
            buffers[key] = momentum * buffers[key] + gradient
            reference[key] = reference[key] - learning_rate * buffers[key]
    for key in reference:
        np.testing.assert_allclose(np.asarray(params[key]), reference[key], rtol=1e-5, atol=1e-6)


def test_ema_update_matches_formula():
    target = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(3.0)}}
    online = {"a": jnp.array([3.0, -2.0]), "b": {"c": jnp.array(0.0)}}
    updated = ema_update(target, online, 0.99)
    np.testing.assert_allclose(updated["a"], [0.99 * 1 + 0.01 * 3, 0.99 * 2 - 0.01 * 2], rtol=1e-6)
    np.testing.assert_allclose(updated["b"]["c"], 0.99 * 3, rtol=1e-6)


def test_ema_with_zero_momentum_copies_online():
    target = {"a": jnp.array([1.0, 2.0])}
    online = {"a": jnp.array([5.0, 6.0])}
    np.testing.assert_array_equal(ema_update(target, online, 0.0)["a"], online["a"])


def test_ema_under_jit_equals_eager():
    target = {"a": jax.random.normal(jax.random.PRNGKey(0), (5,))}
    online = {"a": jax.random.normal(jax.random.PRNGKey(1), (5,))}
    eager = ema_update(target, online, 0.9)
    jitted = jax.jit(ema_update, static_argnums=2)(target, online, 0.9)
    np.testing.assert_allclose(eager["a"], jitted["a"], rtol=1e-6)
