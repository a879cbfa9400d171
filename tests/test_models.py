"""Tests for ascl_jax.models: SplitBatchNorm, ResNet backbones, projector and encoder."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from ascl_jax.models import (
    MODELS,
    Encoder,
    Projector,
    ResNet,
    SplitBatchNorm,
    create_encoder,
    feature_dim,
)

EPSILON = 1e-5
MOMENTUM = 0.9


# ---------------------------------------------------------------------------------------------
# SplitBatchNorm
# ---------------------------------------------------------------------------------------------


def reference_split_bn(x, scale, bias, running_mean, running_var, num_groups, train):
    """Compute split BatchNorm in float64 NumPy straight from the formula.

    Returns the output and the new running mean and variance (unbiased, averaged over groups).
    """
    x = np.asarray(x, np.float64)
    scale = np.asarray(scale, np.float64)
    bias = np.asarray(bias, np.float64)
    running_mean = np.asarray(running_mean, np.float64)
    running_var = np.asarray(running_var, np.float64)
    if not train:
        y = (x - running_mean) / np.sqrt(running_var + EPSILON) * scale + bias
        return y, running_mean, running_var

    group_size = x.shape[0] // num_groups
    axes = tuple(range(x.ndim - 1))
    y = np.empty_like(x)
    group_means, group_unbiased_vars = [], []
    for g in range(num_groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        group = x[rows]
        count = group.size // group.shape[-1]
        mu = group.sum(axis=axes) / count
        var = ((group - mu) ** 2).sum(axis=axes) / count
        y[rows] = (group - mu) / np.sqrt(var + EPSILON) * scale + bias
        group_means.append(mu)
        group_unbiased_vars.append(var * count / (count - 1))
    new_mean = MOMENTUM * running_mean + (1 - MOMENTUM) * np.mean(group_means, axis=0)
    new_var = MOMENTUM * running_var + (1 - MOMENTUM) * np.mean(group_unbiased_vars, axis=0)
    return y, new_mean, new_var


def make_bn_input(rng, shape):
    """Draw an input whose channels and examples have clearly different means and scales."""
    num_examples, channels = shape[0], shape[-1]
    x = rng.normal(size=shape) * (0.5 + 2.0 * rng.random(channels))
    offsets = 0.7 * np.arange(num_examples).reshape((-1,) + (1,) * (len(shape) - 1))
    return (x + offsets + rng.normal(size=channels)).astype(np.float32)


def random_bn_variables(rng, channels):
    """Return non-trivial SplitBatchNorm variables (scale, bias and running statistics)."""
    return {
        "params": {
            "scale": jnp.asarray(rng.uniform(0.5, 2.0, channels), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=channels), jnp.float32),
        },
        "batch_stats": {
            "mean": jnp.asarray(rng.normal(size=channels), jnp.float32),
            "var": jnp.asarray(rng.uniform(0.5, 3.0, channels), jnp.float32),
        },
    }


class SplitBatchNormTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        (1, (8, 3, 3, 5)),
        (2, (8, 3, 3, 5)),
        (4, (8, 3, 3, 5)),
        (8, (8, 2, 2, 3)),
        (3, (6, 4)),
    )
    def test_train_matches_numpy_reference(self, num_groups, shape):
        rng = np.random.default_rng(num_groups)
        x = make_bn_input(rng, shape)
        variables = random_bn_variables(rng, shape[-1])
        module = SplitBatchNorm(num_groups=num_groups, momentum=MOMENTUM, epsilon=EPSILON)

        apply = self.variant(
            lambda v, x: module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        )
        y, updates = apply(variables, x)

        expected_y, expected_mean, expected_var = reference_split_bn(
            x, variables["params"]["scale"], variables["params"]["bias"],
            variables["batch_stats"]["mean"], variables["batch_stats"]["var"],
            num_groups, train=True)
        np.testing.assert_allclose(y, expected_y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(updates["batch_stats"]["mean"], expected_mean, rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(updates["batch_stats"]["var"], expected_var, rtol=1e-5,
                                   atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_eval_uses_running_stats_unchanged(self):
        rng = np.random.default_rng(0)
        # 3 examples with num_groups=2: evaluation mode accepts any batch size.
        x = make_bn_input(rng, (3, 2, 2, 4))
        variables = random_bn_variables(rng, 4)
        module = SplitBatchNorm(num_groups=2)

        apply = self.variant(
            lambda v, x: module.apply(v, x, use_running_average=True, mutable=["batch_stats"])
        )
        y, updates = apply(variables, x)

        expected_y, _, _ = reference_split_bn(
            x, variables["params"]["scale"], variables["params"]["bias"],
            variables["batch_stats"]["mean"], variables["batch_stats"]["var"],
            num_groups=2, train=False)
        np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])

    def test_one_group_matches_flax_batch_norm(self):
        rng = np.random.default_rng(1)
        x = make_bn_input(rng, (6, 3, 3, 4))
        variables = random_bn_variables(rng, 4)
        count = 6 * 3 * 3

        flax_bn = nn.BatchNorm(momentum=MOMENTUM, epsilon=EPSILON)
        flax_y, flax_updates = flax_bn.apply(variables, x, use_running_average=False,
                                             mutable=["batch_stats"])
        biased_bn = SplitBatchNorm(num_groups=1, unbiased_running_var=False)
        biased_y, biased_updates = biased_bn.apply(variables, x, use_running_average=False,
                                                   mutable=["batch_stats"])
        default_bn = SplitBatchNorm(num_groups=1)
        default_y, default_updates = default_bn.apply(variables, x, use_running_average=False,
                                                      mutable=["batch_stats"])

        np.testing.assert_allclose(biased_y, flax_y, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(biased_updates, flax_updates, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(default_y, flax_y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(default_updates["batch_stats"]["mean"],
                                   flax_updates["batch_stats"]["mean"], rtol=1e-5, atol=1e-6)
        # Undo the running-average step to compare the batch variances themselves.
        old_var = variables["batch_stats"]["var"]
        flax_batch_var = (flax_updates["batch_stats"]["var"] - MOMENTUM * old_var) / (1 - MOMENTUM)
        default_batch_var = ((default_updates["batch_stats"]["var"] - MOMENTUM * old_var)
                             / (1 - MOMENTUM))
        np.testing.assert_allclose(default_batch_var, flax_batch_var * count / (count - 1),
                                   rtol=1e-4)

        flax_eval = flax_bn.apply(variables, x, use_running_average=True)
        split_eval = default_bn.apply(variables, x, use_running_average=True)
        np.testing.assert_allclose(split_eval, flax_eval, rtol=1e-5, atol=1e-5)

    def test_variables_named_like_flax(self):
        x = jnp.ones((4, 2, 2, 3))
        variables = SplitBatchNorm(num_groups=2).init(jax.random.key(0), x,
                                                      use_running_average=False)
        reference = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
        chex.assert_trees_all_equal_structs(variables, reference)
        chex.assert_trees_all_equal(variables, reference)

    def test_groups_are_independent(self):
        rng = np.random.default_rng(2)
        x = make_bn_input(rng, (8, 2, 2, 3))
        changed = x.copy()
        changed[4:] = 10.0 * rng.normal(size=changed[4:].shape) - 3.0
        module = SplitBatchNorm(num_groups=2)
        variables = module.init(jax.random.key(0), x, use_running_average=False)

        def apply(inputs):
            y, _ = module.apply(variables, inputs, use_running_average=False,
                                mutable=["batch_stats"])
            return np.asarray(y)

        y, y_changed = apply(x), apply(changed)
        np.testing.assert_array_equal(y_changed[:4], y[:4])
        assert not np.allclose(y_changed[4:], y[4:])

    def test_bf16_input_keeps_float32_state(self):
        rng = np.random.default_rng(3)
        x = make_bn_input(rng, (4, 3, 3, 2))
        module = SplitBatchNorm(num_groups=2, dtype=jnp.bfloat16)
        variables = module.init(jax.random.key(0), x, use_running_average=False)
        y, updates = module.apply(variables, jnp.asarray(x, jnp.bfloat16),
                                  use_running_average=False, mutable=["batch_stats"])
        expected_y, _, _ = reference_split_bn(
            x, variables["params"]["scale"], variables["params"]["bias"],
            variables["batch_stats"]["mean"], variables["batch_stats"]["var"],
            num_groups=2, train=True)

        assert y.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(y, np.float32), expected_y, atol=0.1)
        assert updates["batch_stats"]["mean"].dtype == jnp.float32
        assert updates["batch_stats"]["var"].dtype == jnp.float32

    def test_indivisible_batch_raises(self):
        module = SplitBatchNorm(num_groups=4)
        x = jnp.ones((6, 2, 2, 3))
        variables = module.init(jax.random.key(0), x, use_running_average=True)
        with pytest.raises(ValueError, match=r"batch size 6 and num_groups 4"):
            module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])

    def test_single_value_per_group_raises(self):
        module = SplitBatchNorm(num_groups=4)
        x = jnp.ones((4, 1, 1, 3))
        variables = module.init(jax.random.key(0), x, use_running_average=True)
        with pytest.raises(ValueError, match=r"more than one value per channel"):
            module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])


# ---------------------------------------------------------------------------------------------
# Shapes and configuration (traced with jax.eval_shape, nothing is compiled)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stem,image_size", [("cifar", 8), ("imagenet", 16)])
def test_encoder_output_shapes(model, stem, image_size):
    width, projection_dim = 4, 8
    encoder = create_encoder(model, width=width, stem=stem, bn_groups=2, hidden_dim=16,
                             projection_dim=projection_dim)
    images = jax.ShapeDtypeStruct((4, image_size, image_size, 3), jnp.float32)

    variables = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False),
                               images)
    (features, projection), updates = jax.eval_shape(
        lambda v, x: encoder.apply(v, x, train=True, mutable=["batch_stats"]), variables, images)
    eval_features, eval_projection = jax.eval_shape(
        lambda v, x: encoder.apply(v, x, train=False), variables, images)

    chex.assert_shape(features, (4, feature_dim(model, width)))
    chex.assert_shape(projection, (4, projection_dim))
    chex.assert_shape(eval_features, (4, feature_dim(model, width)))
    chex.assert_shape(eval_projection, (4, projection_dim))
    assert set(variables) == {"params", "batch_stats"}
    chex.assert_trees_all_equal_shapes(updates["batch_stats"], variables["batch_stats"])
    kernel = variables["params"]["projector"]["hidden"]["kernel"]
    chex.assert_shape(kernel, (feature_dim(model, width), 16))


def test_feature_dim_values():
    assert feature_dim("resnet10", 8) == 64
    assert feature_dim("resnet18") == 512
    assert feature_dim("resnet34", 64) == 512
    assert feature_dim("resnet50") == 2048
    assert feature_dim("resnet50", 4) == 128


def test_imagenet_stem_downsamples_by_four():
    backbone = ResNet(stage_sizes=(1,), width=4, stem="imagenet")
    images = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)
    variables = jax.eval_shape(lambda x: backbone.init(jax.random.key(0), x, train=False), images)
    chex.assert_shape(variables["params"]["stem"]["conv"]["kernel"], (7, 7, 1, 4))

    _, state = jax.eval_shape(
        lambda v, x: backbone.apply(v, x, train=False, capture_intermediates=True,
                                    mutable=["intermediates"]),
        variables, images)
    intermediates = state["intermediates"]
    # The stride-2 convolution halves 16 to 8, the stride-2 max-pool halves 8 to 4, and the
    # first stage keeps that size.
    chex.assert_shape(intermediates["stem"]["__call__"][0], (2, 8, 8, 4))
    chex.assert_shape(intermediates["stage1_block1"]["__call__"][0], (2, 4, 4, 4))


def test_cifar_maxpool_stem_downsamples_by_two():
    backbone = ResNet(stage_sizes=(1,), width=4, stem="cifar_maxpool")
    images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: backbone.init(jax.random.key(0), x, train=False), images)
    chex.assert_shape(variables["params"]["stem"]["conv"]["kernel"], (3, 3, 3, 4))

    _, state = jax.eval_shape(
        lambda v, x: backbone.apply(v, x, train=False, capture_intermediates=True,
                                    mutable=["intermediates"]),
        variables, images)
    # The stride-1 convolution keeps 16, the stride-2 max-pool halves it to 8.
    chex.assert_shape(state["intermediates"]["stage1_block1"]["__call__"][0], (2, 8, 8, 4))


def test_resnet50_uses_bottleneck_blocks():
    encoder = create_encoder("resnet50", width=4, hidden_dim=8, projection_dim=4)
    images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), images)
    backbone = variables["params"]["backbone"]
    stage_blocks = [sum(1 for name in backbone if name.startswith(f"stage{stage}_"))
                    for stage in range(1, 5)]
    assert stage_blocks == [3, 4, 6, 3]
    chex.assert_shape(backbone["stage1_block1"]["conv_bn3"]["conv"]["kernel"], (1, 1, 4, 16))
    chex.assert_shape(backbone["stage4_block1"]["shortcut"]["conv"]["kernel"], (1, 1, 64, 128))


def test_bf16_encoder_keeps_float32_params():
    encoder = create_encoder("resnet10", width=4, hidden_dim=8, projection_dim=4,
                             dtype=jnp.bfloat16)
    images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), images)
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"model": "resnet101"}, r"'resnet101'.*resnet10, resnet18, resnet34, resnet50"),
        ({"model": "resnet18", "stem": "tiny"}, r"'tiny'.*cifar, cifar_maxpool, imagenet"),
        ({"model": "resnet18", "bn_groups": 0}, r"bn_groups .* got 0"),
        ({"model": "resnet18", "width": -4}, r"width .* got -4"),
        ({"model": "resnet18", "projection_dim": 0}, r"projection_dim .* got 0"),
    ],
)
def test_create_encoder_rejects_bad_config(kwargs, message):
    model = kwargs.pop("model")
    with pytest.raises(ValueError, match=message):
        create_encoder(model, **kwargs)


def test_feature_dim_rejects_unknown_model():
    with pytest.raises(ValueError, match=r"'vit'.*resnet18"):
        feature_dim("vit", 64)


def test_resnet_rejects_unknown_stem_and_block():
    images = jnp.ones((2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"stem 'tiny'.*cifar, cifar_maxpool, imagenet"):
        ResNet(stage_sizes=(1,), stem="tiny").init(jax.random.key(0), images, train=False)
    with pytest.raises(ValueError, match=r"block 'wide'.*basic, bottleneck"):
        ResNet(stage_sizes=(1,), block="wide").init(jax.random.key(0), images, train=False)


def test_encoder_indivisible_batch_raises():
    encoder = create_encoder("resnet10", width=4, bn_groups=4, hidden_dim=8, projection_dim=4)
    images = jax.ShapeDtypeStruct((6, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), images)
    with pytest.raises(ValueError, match=r"batch size 6 and num_groups 4"):
        jax.eval_shape(lambda v, x: encoder.apply(v, x, train=True, mutable=["batch_stats"]),
                       variables, images)


# ---------------------------------------------------------------------------------------------
# Compiled forward passes of a small greyscale encoder
# ---------------------------------------------------------------------------------------------

GREY_BATCH = 4
GREY_GROUPS = 2
GREY_WIDTH = 4
GREY_HIDDEN = 64


@pytest.fixture(scope="module")
def grey_encoder():
    """Return a resnet10 encoder for 28x28 greyscale images, its variables and jitted applies."""
    encoder = create_encoder("resnet10", width=GREY_WIDTH, bn_groups=GREY_GROUPS,
                             hidden_dim=GREY_HIDDEN, projection_dim=16)
    images = jnp.zeros((GREY_BATCH, 28, 28, 1), jnp.float32)
    # Compiling init is dominated by the random number generator. With jax 0.10.2 on CPU the
    # "rbg" generator compiled about 4x faster than the default threefry (4 s against 17 s).
    init_key = jax.random.key(0, impl="rbg")
    variables = jax.jit(lambda x: encoder.init(init_key, x, train=False))(images)
    train_apply = jax.jit(
        lambda v, x: encoder.apply(v, x, train=True, mutable=["batch_stats"]))
    eval_apply = jax.jit(lambda v, x: encoder.apply(v, x, train=False))
    return encoder, variables, train_apply, eval_apply


def grey_images(seed):
    return jax.random.normal(jax.random.key(seed), (GREY_BATCH, 28, 28, 1), jnp.float32)


def test_greyscale_train_step_outputs(grey_encoder):
    encoder, variables, train_apply, _ = grey_encoder
    (features, projection), updates = train_apply(variables, grey_images(1))

    assert isinstance(encoder, Encoder)
    chex.assert_shape(features, (GREY_BATCH, feature_dim("resnet10", GREY_WIDTH)))
    chex.assert_shape(projection, (GREY_BATCH, 16))
    chex.assert_tree_all_finite((features, projection, updates))
    # Features come after a ReLU and average pooling, so they are non-negative.
    assert float(jnp.min(features)) >= 0.0
    old_mean = variables["batch_stats"]["backbone"]["stem"]["bn"]["mean"]
    new_mean = updates["batch_stats"]["backbone"]["stem"]["bn"]["mean"]
    assert not np.allclose(new_mean, old_mean)


def test_train_mode_groups_are_independent(grey_encoder):
    _, variables, train_apply, _ = grey_encoder
    images = grey_images(2)
    group_size = GREY_BATCH // GREY_GROUPS
    changed = images.at[group_size:].set(3.0 * grey_images(3)[group_size:] + 1.0)

    (features, projection), _ = train_apply(variables, images)
    (changed_features, changed_projection), _ = train_apply(variables, changed)

    np.testing.assert_allclose(changed_features[:group_size], features[:group_size],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(changed_projection[:group_size], projection[:group_size],
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(changed_features[group_size:], features[group_size:])


def test_eval_mode_is_per_example(grey_encoder):
    _, variables, train_apply, eval_apply = grey_encoder
    _, updates = train_apply(variables, grey_images(4))
    trained = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    images = grey_images(5)
    # Reverse the batch: with running statistics each output depends on its own image only.
    features, projection = eval_apply(trained, images)
    reversed_features, reversed_projection = eval_apply(trained, images[::-1])

    np.testing.assert_allclose(reversed_features[::-1], features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reversed_projection[::-1], projection, rtol=1e-5, atol=1e-6)
    _, train_projection = train_apply(trained, images)[0]
    assert not np.allclose(train_projection, projection)


def test_conv_init_is_kaiming_fan_out(grey_encoder):
    _, variables, _, _ = grey_encoder
    # The first convolution of stage 4 maps 4 * width to 8 * width channels, so fan_in and
    # fan_out differ by a factor 2.
    kernel = np.asarray(variables["params"]["backbone"]["stage4_block1"]["conv_bn1"]["conv"]
                        ["kernel"])
    chex.assert_shape(kernel, (3, 3, 4 * GREY_WIDTH, 8 * GREY_WIDTH))
    fan_out = 3 * 3 * 8 * GREY_WIDTH
    expected_std = math.sqrt(2.0 / fan_out)
    assert abs(kernel.std() / expected_std - 1.0) < 0.05
    assert abs(kernel.mean()) < 0.05 * expected_std
    # A plain normal puts 1.2% of the values beyond 2.5 sigma. flax's truncated normal with the
    # same std is cut at about 2.27 sigma.
    assert np.mean(np.abs(kernel) > 2.5 * expected_std) > 0.005


def test_projector_init_is_torch_uniform(grey_encoder):
    _, variables, _, _ = grey_encoder
    projector = variables["params"]["projector"]
    for layer, fan_in in [("hidden", feature_dim("resnet10", GREY_WIDTH)),
                          ("output", GREY_HIDDEN)]:
        bound = 1.0 / math.sqrt(fan_in)
        for name in ("kernel", "bias"):
            values = np.abs(np.asarray(projector[layer][name]))
            assert values.max() <= bound, (layer, name)
            assert values.max() > 0.8 * bound, (layer, name)


def test_bf16_compute_gives_finite_float32_output(grey_encoder):
    # A bfloat16 encoder has the same float32 variables as the float32 one, so reuse them.
    _, variables, _, _ = grey_encoder
    encoder = create_encoder("resnet10", width=GREY_WIDTH, bn_groups=GREY_GROUPS,
                             hidden_dim=GREY_HIDDEN, projection_dim=16, dtype=jnp.bfloat16)
    (features, projection), updates = jax.jit(
        lambda v, x: encoder.apply(v, x, train=True, mutable=["batch_stats"]))(
            variables, grey_images(6))

    assert features.dtype == jnp.float32
    assert projection.dtype == jnp.float32
    chex.assert_tree_all_finite((features, projection, updates))
    chex.assert_trees_all_equal_dtypes(updates["batch_stats"], variables["batch_stats"])
    assert not np.allclose(features, 0.0)


def test_projector_matches_formula():
    projector = Projector(hidden_dim=6, out_dim=3)
    x = jax.random.normal(jax.random.key(7), (5, 4))
    variables = projector.init(jax.random.key(0, impl="rbg"), x)
    params = variables["params"]
    hidden = np.maximum(np.asarray(x) @ params["hidden"]["kernel"] + params["hidden"]["bias"], 0)
    expected = hidden @ params["output"]["kernel"] + params["output"]["bias"]
    np.testing.assert_allclose(projector.apply(variables, x), expected, rtol=1e-5, atol=1e-6)
