"""Tests for the on-device augmentations in ascl_jax.augment.

References are written independently in float64 numpy from torchvision's formulas. Hue uses the
standard library's colorsys, and the crop resampling and eval resize use Pillow's bilinear
resize of a cropped "F" (float32) image, the path torchvision takes for PIL images.
"""

import colorsys
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ascl_jax import augment

LUMA = np.array([0.299, 0.587, 0.114])
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
GREY_MEAN = (0.5,)
GREY_STD = (0.25,)


def _stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (CIFAR_MEAN, CIFAR_STD) if channels == 3 else (GREY_MEAN, GREY_STD)


def _random_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _random_uint8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _keys(count: int, seed: int = 0) -> jax.Array:
    return jax.random.split(jax.random.key(seed), count)


@functools.lru_cache(maxsize=None)
def _jitted_batch_view(view_name: str, size: int, channels: int):
    """Return a jitted augment_batch for one view, cached so each configuration compiles once."""
    mean, std = _stats(channels)
    view = augment.VIEWS[view_name]
    return jax.jit(
        lambda key, images: augment.augment_batch(
            key, images, view, size=size, mean=mean, std=std
        )
    )


# ----------------------------------------------------------------------------------------------
# float64 numpy references
# ----------------------------------------------------------------------------------------------


def np_gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float64)
    if image.shape[-1] == 1:
        return image
    return (image @ LUMA)[..., None]


def np_blend(image: np.ndarray, other, factor: float) -> np.ndarray:
    return np.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def np_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return np_blend(np.asarray(image, np.float64), 0.0, factor)


def np_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    return np_blend(np.asarray(image, np.float64), np_gray(image).mean(), factor)


def np_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    if image.shape[-1] == 1:
        return np.asarray(image, np.float64)
    return np_blend(np.asarray(image, np.float64), np_gray(image), factor)


def np_hue(image: np.ndarray, shift: float) -> np.ndarray:
    if image.shape[-1] == 1:
        return np.asarray(image, np.float64)
    flat = np.asarray(image, np.float64).reshape(-1, 3)
    out = np.empty_like(flat)
    for index, (red, green, blue) in enumerate(flat):
        hue, saturation, value = colorsys.rgb_to_hsv(red, green, blue)
        out[index] = colorsys.hsv_to_rgb((hue + shift) % 1.0, saturation, value)
    return out.reshape(image.shape)


NP_JITTER_OPS = {
    augment.BRIGHTNESS: np_brightness,
    augment.CONTRAST: np_contrast,
    augment.SATURATION: np_saturation,
    augment.HUE: np_hue,
}


def np_gaussian_blur(image: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    image = np.asarray(image, np.float64)
    height, width = image.shape[:2]
    padded = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
    rows = sum(kernel[d] * padded[d : d + height] for d in range(kernel.size))
    padded = np.pad(rows, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
    return sum(kernel[d] * padded[:, d : d + width] for d in range(kernel.size))


def pil_resized_crop(image: np.ndarray, top: int, left: int, height: int, width: int, size: int):
    """Crop then resize each channel with Pillow's (antialiased) bilinear filter."""
    channels = []
    for channel in range(image.shape[-1]):
        plane = Image.fromarray(np.ascontiguousarray(image[..., channel], dtype=np.float32))
        cropped = plane.crop((left, top, left + width, top + height))
        channels.append(np.asarray(cropped.resize((size, size), Image.BILINEAR)))
    return np.stack(channels, axis=-1)


# ----------------------------------------------------------------------------------------------
# Views: shapes, determinism, finiteness
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("view_name", ["strong", "weak"])
@pytest.mark.parametrize("channels", [1, 3])
def test_views_shape_dtype_finite(view_name, channels):
    images = _random_uint8((4, 12, 10, channels))
    out = _jitted_batch_view(view_name, 8, channels)(jax.random.key(0), images)
    chex.assert_shape(out, (4, 8, 8, channels))
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))


def test_views_float_input_matches_uint8():
    images = _random_uint8((4, 12, 10, 1))
    view = _jitted_batch_view("weak", 8, 1)
    from_uint8 = view(jax.random.key(5), images)
    from_float = view(jax.random.key(5), images.astype(np.float32) / 255.0)
    np.testing.assert_allclose(np.asarray(from_uint8), np.asarray(from_float), atol=1e-5)


def test_strong_view_deterministic_per_key():
    images = _random_uint8((4, 12, 10, 3))
    view = _jitted_batch_view("strong", 8, 3)
    first = np.asarray(view(jax.random.key(1), images))
    again = np.asarray(view(jax.random.key(1), images))
    other = np.asarray(view(jax.random.key(2), images))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


@pytest.mark.parametrize("view_name", ["strong", "weak"])
def test_views_differ_across_batch(view_name):
    # The same image in every row must still get a different augmentation per row.
    image = _random_uint8((12, 10, 3))
    images = np.broadcast_to(image, (4, 12, 10, 3))
    out = np.asarray(_jitted_batch_view(view_name, 8, 3)(jax.random.key(3), images))
    for row in range(1, 4):
        assert not np.allclose(out[0], out[row]), f"rows 0 and {row} are identical"


def test_views_registry():
    assert augment.VIEWS["strong"] is augment.strong_view
    assert augment.VIEWS["weak"] is augment.weak_view


def test_strong_view_finite_on_extreme_images():
    # Black, white and grey images hit the V = 0 and chroma = 0 branches of the HSV conversion.
    images = np.stack([np.full((12, 10, 3), level, np.uint8) for level in (0, 255, 128, 64)])
    out = _jitted_batch_view("strong", 8, 3)(jax.random.key(4), images)
    assert np.all(np.isfinite(np.asarray(out)))


# ----------------------------------------------------------------------------------------------
# Random resized crop
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_crop_full_scale_is_identity(channels):
    image = _random_image((9, 9, channels))
    for key in _keys(3):
        out = augment.random_resized_crop(key, image, size=9, scale=(1.0, 1.0), ratio=(1.0, 1.0))
        np.testing.assert_allclose(np.asarray(out), image, atol=1e-6)


def test_crop_uint8_scaled_to_unit_range():
    image = _random_uint8((6, 6, 3))
    out = augment.random_resized_crop(
        jax.random.key(0), image, size=6, scale=(1.0, 1.0), ratio=(1.0, 1.0)
    )
    np.testing.assert_allclose(np.asarray(out), image / 255.0, atol=1e-6)


@pytest.mark.parametrize(
    "box",
    [(3, 2, 18, 15), (5, 4, 5, 6), (0, 0, 24, 20), (1, 1, 7, 19)],
    ids=["downscale", "upscale", "whole", "mixed"],
)
def test_resize_box_matches_pillow(box):
    image = _random_image((24, 20, 3))
    top, left, height, width = box
    out = augment.resize_box(image, top, left, height, width, 8)
    expected = pil_resized_crop(image, top, left, height, width, 8)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_random_resized_crop_matches_pillow_on_sampled_box():
    image = _random_image((16, 20, 3))
    key = jax.random.key(11)
    top, left, height, width = (int(v) for v in augment.sample_crop_box(key, 16, 20))
    out = augment.random_resized_crop(key, image, size=8)
    expected = pil_resized_crop(image, top, left, height, width, 8)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_crop_fallback_is_clamped_central_crop():
    # An area fraction above 1 never fits, so every draw falls back. The 10 x 40 image is wider
    # than 4/3, so the crop keeps the height and takes width round(10 * 4/3) = 13.
    box = augment.sample_crop_box(jax.random.key(0), 10, 40, scale=(2.0, 3.0))
    assert tuple(int(v) for v in box) == (0, 13, 10, 13)
    tall = augment.sample_crop_box(jax.random.key(0), 40, 10, scale=(2.0, 3.0))
    assert tuple(int(v) for v in tall) == (13, 0, 13, 10)


def test_crop_box_statistics():
    height = width = 64
    sample = jax.jit(jax.vmap(lambda key: jnp.stack(augment.sample_crop_box(key, height, width))))
    boxes = np.asarray(sample(_keys(4000, seed=1)))
    top, left, crop_height, crop_width = boxes.T
    area = crop_height * crop_width / (height * width)
    aspect = crop_width / crop_height

    assert np.all(top >= 0)
    assert np.all(left >= 0)
    assert np.all(top + crop_height <= height)
    assert np.all(left + crop_width <= width)
    # Rounding h and w to integers can move the area fraction slightly below 0.2.
    assert area.min() >= 0.18
    assert area.max() <= 1.0
    assert 0.5 < area.mean() < 0.65
    assert aspect.min() >= 0.7
    assert aspect.max() <= 1.4
    # Offsets are uniform, so the mean relative offset is about one half.
    slack = height - crop_height
    relative = top[slack > 0] / slack[slack > 0]
    assert abs(relative.mean() - 0.5) < 0.03


# ----------------------------------------------------------------------------------------------
# Flip, grayscale and colour jitter
# ----------------------------------------------------------------------------------------------


def test_flip_is_exact():
    image = _random_image((5, 7, 3))
    flipped = augment.horizontal_flip(jax.random.key(0), image, p=1.0)
    kept = augment.horizontal_flip(jax.random.key(0), image, p=0.0)
    np.testing.assert_array_equal(np.asarray(flipped), image[:, ::-1, :])
    np.testing.assert_array_equal(np.asarray(kept), image)


def test_flip_rate_is_half():
    image = jnp.asarray(_random_image((4, 5, 1)))
    flip = jax.jit(jax.vmap(lambda key: augment.horizontal_flip(key, image)))
    out = np.asarray(flip(_keys(4000, seed=2)))
    flipped = np.all(out == np.asarray(image)[:, ::-1], axis=(1, 2, 3))
    kept = np.all(out == np.asarray(image), axis=(1, 2, 3))
    assert np.all(flipped ^ kept)
    assert abs(flipped.mean() - 0.5) < 0.04


def test_grayscale_against_luma():
    image = _random_image((5, 6, 3))
    out = np.asarray(augment.random_grayscale(jax.random.key(0), image, p=1.0))
    expected = np.repeat(np_gray(image), 3, axis=-1)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    kept = augment.random_grayscale(jax.random.key(0), image, p=0.0)
    np.testing.assert_array_equal(np.asarray(kept), image)


def test_grayscale_noop_for_one_channel():
    image = _random_image((5, 6, 1))
    out = augment.random_grayscale(jax.random.key(0), image, p=1.0)
    np.testing.assert_array_equal(np.asarray(out), image)


def test_grayscale_rate():
    image = jnp.asarray(_random_image((3, 3, 3)))
    gray = jax.jit(jax.vmap(lambda key: augment.random_grayscale(key, image, p=0.2)))
    out = np.asarray(gray(_keys(4000, seed=3)))
    converted = np.all(out[..., :1] == out, axis=(1, 2, 3))
    assert abs(converted.mean() - 0.2) < 0.03


@pytest.mark.parametrize("factor", [0.0, 0.6, 1.0, 1.4])
def test_brightness_contrast_saturation_against_numpy(factor):
    image = _random_image((6, 5, 3), seed=1)
    for adjust, reference in [
        (augment.adjust_brightness, np_brightness),
        (augment.adjust_contrast, np_contrast),
        (augment.adjust_saturation, np_saturation),
    ]:
        out = np.asarray(adjust(jnp.asarray(image), factor))
        expected = reference(image, factor)
        np.testing.assert_allclose(out, expected, atol=1e-6, err_msg=adjust.__name__)


def test_contrast_one_channel_uses_image_mean():
    image = _random_image((6, 5, 1), seed=2)
    out = np.asarray(augment.adjust_contrast(jnp.asarray(image), 0.5))
    np.testing.assert_allclose(out, 0.5 * image + 0.5 * image.mean(), atol=1e-6)


def test_hue_zero_is_identity():
    image = _random_image((6, 5, 3), seed=3)
    out = np.asarray(augment.adjust_hue(jnp.asarray(image), 0.0))
    np.testing.assert_allclose(out, image, atol=1e-6)


@pytest.mark.parametrize("shift", [0.1, -0.1, 0.5, -0.37])
def test_hue_shift_against_colorsys(shift):
    image = _random_image((4, 5, 3), seed=4)
    # Add grey, black, white and primary pixels, which take the chroma = 0 and max-channel ties.
    image[0, :5] = [[0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], [1, 0, 0], [0.2, 0.7, 0.7]]
    out = np.asarray(augment.adjust_hue(jnp.asarray(image), shift))
    np.testing.assert_allclose(out, np_hue(image, shift), atol=2e-6)


def test_hue_third_turn_maps_red_to_green():
    red = jnp.array([[[1.0, 0.0, 0.0]]])
    out = np.asarray(augment.adjust_hue(red, 1.0 / 3.0))
    np.testing.assert_allclose(out, [[[0.0, 1.0, 0.0]]], atol=1e-6)


def test_jitter_params_ranges_and_order():
    sample = jax.jit(
        jax.vmap(
            lambda key: augment.sample_jitter_params(
                key, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1
            )
        )
    )
    order, factors = (np.asarray(a) for a in sample(_keys(4000, seed=5)))
    assert np.all(np.sort(order, axis=1) == np.arange(4))
    assert np.all((factors[:, :3] >= 0.6) & (factors[:, :3] <= 1.4))
    assert np.all(np.abs(factors[:, 3]) <= 0.1)
    first_op_rate = np.bincount(order[:, 0], minlength=4) / len(order)
    np.testing.assert_allclose(first_op_rate, 0.25, atol=0.03)


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_applies_ops_in_sampled_order(channels):
    image = _random_image((5, 4, channels), seed=6)
    strengths = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    keys = _keys(48, seed=7)
    jitter = jax.jit(jax.vmap(lambda key: augment.color_jitter(key, image, **strengths)))
    params = jax.jit(jax.vmap(lambda key: augment.sample_jitter_params(key, **strengths)))
    out = np.asarray(jitter(keys))
    orders, factors = (np.asarray(a) for a in params(keys))

    for index in range(len(keys)):
        expected = np.asarray(image, np.float64)
        for operation in orders[index]:
            expected = NP_JITTER_OPS[operation](expected, factors[index, operation])
        message = f"order {orders[index]}"
        np.testing.assert_allclose(out[index], expected, atol=1e-5, err_msg=message)


def test_jitter_one_channel_skips_saturation_and_hue():
    image = _random_image((5, 4, 1), seed=8)
    only_saturation_hue = augment.color_jitter(
        jax.random.key(0), image, brightness=0.0, contrast=0.0, saturation=0.4, hue=0.1
    )
    np.testing.assert_array_equal(np.asarray(only_saturation_hue), image)


# ----------------------------------------------------------------------------------------------
# Gaussian blur and normalisation
# ----------------------------------------------------------------------------------------------


def test_gaussian_kernel_normalised_and_symmetric():
    kernel = np.asarray(augment.gaussian_kernel(jnp.float32(1.3), 4))
    assert kernel.shape == (9,)
    np.testing.assert_allclose(kernel.sum(), 1.0, atol=1e-6)
    np.testing.assert_allclose(kernel, kernel[::-1], atol=1e-7)
    offsets = np.arange(-4, 5)
    expected = np.exp(-(offsets**2) / (2 * 1.3**2))
    np.testing.assert_allclose(kernel, expected / expected.sum(), atol=1e-6)


def test_blur_matches_numpy_reflect():
    image = _random_image((10, 9, 3), seed=9)
    out = augment.gaussian_blur(jax.random.key(0), image, sigma=(1.0, 1.0), p=1.0)
    expected = np_gaussian_blur(image, sigma=1.0, radius=3)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_blur_preserves_constant_and_mean():
    constant = np.full((8, 8, 3), 0.3, np.float32)
    out = augment.gaussian_blur(jax.random.key(0), constant, sigma=(2.0, 2.0), p=1.0)
    np.testing.assert_allclose(np.asarray(out), constant, atol=1e-6)

    image = _random_image((16, 16, 1), seed=10)
    blurred = np.asarray(augment.gaussian_blur(jax.random.key(0), image, sigma=(2.0, 2.0), p=1.0))
    # Reflect padding keeps the mean only approximately.
    assert abs(blurred.mean() - image.mean()) < 0.01
    assert blurred.std() < image.std()


def test_blur_radius_clamped_on_tiny_image():
    assert augment.blur_radius(3, 5, 2.0) == 2
    assert augment.blur_radius(32, 32, 2.0) == 6
    constant = np.full((3, 5, 1), 0.7, np.float32)
    out = augment.gaussian_blur(jax.random.key(0), constant, p=1.0)
    np.testing.assert_allclose(np.asarray(out), constant, atol=1e-6)


def test_blur_rate_is_half():
    image = jnp.asarray(_random_image((6, 6, 1), seed=11))
    blur = jax.jit(jax.vmap(lambda key: augment.gaussian_blur(key, image)))
    out = np.asarray(blur(_keys(2000, seed=12)))
    unchanged = np.all(out == np.asarray(image), axis=(1, 2, 3))
    assert abs(unchanged.mean() - 0.5) < 0.05


def test_normalize_against_numpy():
    image = _random_image((4, 3, 3), seed=13)
    out = np.asarray(augment.normalize(jnp.asarray(image), CIFAR_MEAN, CIFAR_STD))
    expected = (image - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_eval_view_same_size_only_normalises():
    images = _random_uint8((2, 8, 8, 3))
    out = np.asarray(augment.eval_view(images, size=8, mean=CIFAR_MEAN, std=CIFAR_STD))
    expected = (images / 255.0 - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_eval_view_resizes_like_pillow():
    images = _random_image((2, 16, 12, 1), seed=14)
    out = np.asarray(augment.eval_view(images, size=8, mean=GREY_MEAN, std=GREY_STD))
    chex.assert_shape(out, (2, 8, 8, 1))
    for index in range(2):
        resized = pil_resized_crop(images[index], 0, 0, 16, 12, 8)
        np.testing.assert_allclose(out[index], (resized - 0.5) / 0.25, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


def test_invalid_inputs_raise():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="channels"):
        augment.horizontal_flip(key, np.zeros((4, 4, 2), np.float32))
    with pytest.raises(ValueError, match="augment_batch"):
        augment.horizontal_flip(key, np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        augment.horizontal_flip(key, np.zeros((4, 4, 3), np.int32))
    with pytest.raises(ValueError, match="scale"):
        augment.random_resized_crop(key, np.zeros((4, 4, 3)), size=4, scale=(0.8, 0.2))
    with pytest.raises(ValueError, match="size"):
        augment.random_resized_crop(key, np.zeros((4, 4, 3)), size=0)
    with pytest.raises(ValueError, match="hue"):
        augment.color_jitter(key, np.zeros((4, 4, 3)), hue=0.7)
    with pytest.raises(ValueError, match="probability"):
        augment.random_grayscale(key, np.zeros((4, 4, 3)), p=1.5)
    with pytest.raises(ValueError, match="one value per channel"):
        augment.normalize(np.zeros((4, 4, 1)), CIFAR_MEAN, CIFAR_STD)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        augment.augment_batch(
            key, np.zeros((4, 4, 3)), augment.weak_view, size=4, mean=CIFAR_MEAN, std=CIFAR_STD
        )


# ----------------------------------------------------------------------------------------------
# jit and no-jit agree
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _eager_view_result(view_name: str) -> np.ndarray:
    """Return the op-by-op (unjitted) view of a fixed image, computed once for both variants."""
    if view_name == "strong":
        image, key = _random_uint8((10, 10, 3), seed=18), jax.random.key(23)
        mean, std = CIFAR_MEAN, CIFAR_STD
    else:
        image, key = _random_uint8((10, 10, 1), seed=19), jax.random.key(24)
        mean, std = GREY_MEAN, GREY_STD
    return np.asarray(augment.VIEWS[view_name](key, image, size=8, mean=mean, std=std))


class JitAgreementTest(chex.TestCase):
    """Each variant is checked against an independent reference or against the other mode."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_crop_matches_pillow(self):
        image = _random_image((12, 10, 3), seed=15)
        key = jax.random.key(21)
        crop = self.variant(functools.partial(augment.random_resized_crop, size=8))
        top, left, height, width = (int(v) for v in augment.sample_crop_box(key, 12, 10))
        expected = pil_resized_crop(image, top, left, height, width, 8)
        chex.assert_trees_all_close(crop(key, image), expected.astype(np.float32), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_jitter_matches_numpy(self):
        image = _random_image((4, 4, 3), seed=16)
        key = jax.random.key(22)
        order, factors = (
            np.asarray(a)
            for a in augment.sample_jitter_params(
                key, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1
            )
        )
        expected = np.asarray(image, np.float64)
        for operation in order:
            expected = NP_JITTER_OPS[operation](expected, factors[operation])
        out = self.variant(augment.color_jitter)(key, image)
        chex.assert_trees_all_close(out, expected.astype(np.float32), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_blur_matches_numpy(self):
        image = _random_image((9, 9, 1), seed=17)
        blur = self.variant(functools.partial(augment.gaussian_blur, sigma=(0.7, 0.7), p=1.0))
        expected = np_gaussian_blur(image, sigma=0.7, radius=math.ceil(2.1))
        out = blur(jax.random.key(0), image)
        chex.assert_trees_all_close(out, expected.astype(np.float32), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_strong_view_matches_eager(self):
        view = functools.partial(augment.strong_view, size=8, mean=CIFAR_MEAN, std=CIFAR_STD)
        out = self.variant(view)(jax.random.key(23), _random_uint8((10, 10, 3), seed=18))
        chex.assert_trees_all_close(out, _eager_view_result("strong"), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_weak_view_matches_eager(self):
        view = functools.partial(augment.weak_view, size=8, mean=GREY_MEAN, std=GREY_STD)
        out = self.variant(view)(jax.random.key(24), _random_uint8((10, 10, 1), seed=19))
        chex.assert_trees_all_close(out, _eager_view_result("weak"), atol=1e-5)
