"""Build the strong and weak views of an image as jittable per-example JAX functions.

Every function here works on one example: an image of shape [H, W, C] with C in {1, 3}, either
uint8 in [0, 255] or floating point in [0, 1]. `augment_batch` splits a key into one key per
example and vmaps a view over a [B, H, W, C] batch, so that the whole pipeline runs on the
device inside the jitted train step. Shapes are static, all randomness comes from the key, and
random choices are made with `jnp.where` on traced values, never with Python control flow.

The operations follow torchvision's semantics on float images (crop box sampling, the ColorJitter
formulas, RandomGrayscale, GaussianBlur, Normalize), with these deliberate differences:

- Grayscale uses the ITU-R 601 luma weights 0.299, 0.587, 0.114, as PIL's convert("L") does.
  torchvision's tensor functions (transforms/functional_tensor.py) use 0.2989 for red.
- Gaussian blur uses a fixed kernel radius of ceil(3 * max sigma) pixels with reflect padding.
  torchvision takes the kernel size from the caller, and PIL replicates the edge pixels.
- For greyscale images (C = 1), colour jitter applies only brightness and contrast, because
  saturation and hue are undefined for one channel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# ITU-R BT.601 luma weights for (red, green, blue).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# torchvision's RandomResizedCrop tries this many (area, aspect ratio) draws before it falls back
# to a central crop.
MAX_CROP_ATTEMPTS = 10

# Operation indices of colour jitter, in the order of the sampled factors.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

# The recipe's strong view: colour jitter strengths and probabilities, grayscale and blur.
STRONG_JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
STRONG_JITTER_P = 0.8
STRONG_GRAYSCALE_P = 0.2
STRONG_BLUR_SIGMA = (0.1, 2.0)
STRONG_BLUR_P = 0.5

# Crop area fraction of both pretraining views.
DEFAULT_CROP_SCALE = (0.2, 1.0)
DEFAULT_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


# ----------------------------------------------------------------------------------------------
# Input checks and conversion
# ----------------------------------------------------------------------------------------------


def _check_image(image: Array, name: str = "image") -> None:
    """Raise ValueError unless `image` is one [H, W, C] image with C in {1, 3}."""
    if image.ndim != 3:
        raise ValueError(
            f"{name} has shape {tuple(image.shape)}, but one image of shape [H, W, C] is "
            "expected. Use augment_batch to augment a [B, H, W, C] batch."
        )
    if image.shape[-1] not in (1, 3):
        raise ValueError(
            f"{name} has {image.shape[-1]} channels (shape {tuple(image.shape)}), but only "
            "1 (greyscale) or 3 (RGB) channels are supported."
        )
    _check_dtype(image, name)


def _check_dtype(image: Array, name: str) -> None:
    if not (image.dtype == jnp.uint8 or jnp.issubdtype(image.dtype, jnp.floating)):
        raise ValueError(
            f"{name} has dtype {image.dtype}, but uint8 in [0, 255] or a float dtype in [0, 1] "
            "is expected."
        )


def _check_probability(p: float, name: str) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}={p} is not a probability; use a value in [0, 1].")


def _check_interval(interval: Sequence[float], name: str, *, positive: bool) -> None:
    """Raise ValueError unless `interval` is a pair (low, high) with low <= high."""
    if len(interval) != 2:
        raise ValueError(f"{name}={interval} must be a pair (low, high).")
    low, high = interval
    if low > high:
        raise ValueError(f"{name}={interval} has low > high; pass (low, high) with low <= high.")
    if positive and low <= 0:
        raise ValueError(f"{name}={interval} must be positive; use a low value above 0.")


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"size={size!r} is invalid; the output side length must be an int > 0.")


def to_float(image: Array) -> Array:
    """Convert uint8 [0, 255] to float32 [0, 1] and cast floating-point images to float32."""
    if image.dtype == jnp.uint8:
        return image.astype(jnp.float32) / 255.0
    return image.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Random resized crop
# ----------------------------------------------------------------------------------------------


def _central_crop_size(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int]:
    """Return torchvision's fallback crop (height, width): the whole image, ratio clamped."""
    image_ratio = width / height
    if image_ratio < min(ratio):
        crop_width = width
        crop_height = int(round(crop_width / min(ratio)))
    elif image_ratio > max(ratio):
        crop_height = height
        crop_width = int(round(crop_height * max(ratio)))
    else:
        crop_width = width
        crop_height = height
    return crop_height, crop_width


def sample_crop_box(
    key: Array,
    height: int,
    width: int,
    *,
    scale: Sequence[float] = DEFAULT_CROP_SCALE,
    ratio: Sequence[float] = DEFAULT_CROP_RATIO,
) -> tuple[Array, Array, Array, Array]:
    """Sample a RandomResizedCrop box and return int32 scalars (top, left, crop_height, crop_width).

    Each of MAX_CROP_ATTEMPTS attempts draws an area fraction a ~ U(scale) and a log aspect
    ratio log r ~ U(log ratio), then w = round(sqrt(a * H * W * r)) and
    h = round(sqrt(a * H * W / r)). The first attempt with 0 < w <= W and 0 < h <= H wins and
    its offsets are uniform over the valid positions. If none fits, the crop is the central
    crop of the whole image with its aspect ratio clamped to `ratio`.
    """
    # One draw for all attempts and both offsets, because each jax.random call adds its own
    # Threefry computation to compile. Five separate calls compiled about twice as slowly.
    uniforms = jax.random.uniform(key, (2 * MAX_CROP_ATTEMPTS + 2,))
    area_fraction = scale[0] + (scale[1] - scale[0]) * uniforms[:MAX_CROP_ATTEMPTS]
    log_ratio_low, log_ratio_high = math.log(ratio[0]), math.log(ratio[1])
    log_ratio = log_ratio_low + (log_ratio_high - log_ratio_low) * uniforms[
        MAX_CROP_ATTEMPTS : 2 * MAX_CROP_ATTEMPTS
    ]
    target_area = float(height * width) * area_fraction
    aspect_ratio = jnp.exp(log_ratio)
    widths = jnp.round(jnp.sqrt(target_area * aspect_ratio)).astype(jnp.int32)
    heights = jnp.round(jnp.sqrt(target_area / aspect_ratio)).astype(jnp.int32)
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)

    # argmax returns the first True; any() covers the case of no fitting attempt.
    first_fit = jnp.argmax(fits)
    found = jnp.any(fits)
    fallback_height, fallback_width = _central_crop_size(height, width, ratio)
    crop_height = jnp.where(found, heights[first_fit], fallback_height)
    crop_width = jnp.where(found, widths[first_fit], fallback_width)

    # Offsets uniform over {0, ..., H - h}: floor(u * (H - h + 1)), capped against rounding.
    random_top = jnp.minimum(
        jnp.floor(uniforms[-2] * (height - crop_height + 1)).astype(jnp.int32), height - crop_height
    )
    random_left = jnp.minimum(
        jnp.floor(uniforms[-1] * (width - crop_width + 1)).astype(jnp.int32), width - crop_width
    )
    top = jnp.where(found, random_top, (height - crop_height) // 2)
    left = jnp.where(found, random_left, (width - crop_width) // 2)
    return (
        top.astype(jnp.int32),
        left.astype(jnp.int32),
        crop_height.astype(jnp.int32),
        crop_width.astype(jnp.int32),
    )


def interpolation_matrix(start: Array, length: Array, in_size: int, out_size: int) -> Array:
    """Return the [out_size, in_size] antialiased bilinear weights that resample one axis.

    The window covers input pixels [start, start + length) and maps onto out_size output pixels,
    as Pillow's bilinear resize of the cropped image does (the tests compare the two). With pixel
    centres at p + 0.5 and s = length / out_size, output pixel k samples at
    c_k = start + (k + 0.5) * s with the triangle kernel
    w(p) = max(0, 1 - |p + 0.5 - c_k| / max(s, 1)). The kernel widens by s when downscaling
    (antialiasing). Weights outside the window are zero, and each row is normalised to sum to 1.
    """
    start = jnp.asarray(start, jnp.float32)
    length = jnp.asarray(length, jnp.float32)
    step = length / out_size
    support = jnp.maximum(step, 1.0)
    centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step
    pixel_centres = jnp.arange(in_size, dtype=jnp.float32) + 0.5

    distance = jnp.abs(pixel_centres[None, :] - centres[:, None])
    weights = jnp.maximum(0.0, 1.0 - distance / support)
    inside = (pixel_centres >= start) & (pixel_centres < start + length)
    weights = jnp.where(inside[None, :], weights, 0.0)
    # Every centre lies inside the window, within 0.5 of a pixel centre, so no row sums to 0.
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def resize_box(
    image: Array, top: Array, left: Array, crop_height: Array, crop_width: Array, size: int
) -> Array:
    """Resample the box at (top, left) of crop_height x crop_width pixels to size x size.

    The box may be traced, so the crop is not sliced out. Resampling uses row and column weights
    from `interpolation_matrix` in one einsum: out = R @ image @ C^T per channel.
    """
    image = to_float(image)
    height, width = image.shape[0], image.shape[1]
    row_weights = interpolation_matrix(top, crop_height, height, size)
    column_weights = interpolation_matrix(left, crop_width, width, size)
    # HIGHEST keeps float32 accuracy on accelerators whose default matmul uses TF32 or bf16.
    return jnp.einsum(
        "oh,hwc,pw->opc",
        row_weights,
        image,
        column_weights,
        precision=jax.lax.Precision.HIGHEST,
    )


def random_resized_crop(
    key: Array,
    image: Array,
    *,
    size: int,
    scale: Sequence[float] = DEFAULT_CROP_SCALE,
    ratio: Sequence[float] = DEFAULT_CROP_RATIO,
) -> Array:
    """Crop a random box (torchvision RandomResizedCrop) and resize it to float32 [size, size, C].

    See `sample_crop_box` for the box distribution and `interpolation_matrix` for the
    antialiased bilinear resampling.
    """
    _check_image(image)
    _check_size(size)
    _check_interval(scale, "scale", positive=True)
    _check_interval(ratio, "ratio", positive=True)
    height, width = image.shape[0], image.shape[1]
    top, left, crop_height, crop_width = sample_crop_box(
        key, height, width, scale=scale, ratio=ratio
    )
    return resize_box(image, top, left, crop_height, crop_width, size)


# ----------------------------------------------------------------------------------------------
# Flip and colour
# ----------------------------------------------------------------------------------------------


def horizontal_flip(key: Array, image: Array, p: float = 0.5) -> Array:
    """Mirror the image left to right with probability p, returning float32."""
    _check_image(image)
    _check_probability(p, "p")
    image = to_float(image)
    flip = jax.random.bernoulli(key, p)
    return jnp.where(flip, image[:, ::-1, :], image)


def rgb_to_grayscale(image: Array) -> Array:
    """Return the luma 0.299 R + 0.587 G + 0.114 B as [..., 1], or a [..., 1] input unchanged."""
    if image.shape[-1] == 1:
        return image
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    luma = LUMA_WEIGHTS[0] * red + LUMA_WEIGHTS[1] * green + LUMA_WEIGHTS[2] * blue
    return luma[..., None]


def _blend(image: Array, other: Array, factor: Array) -> Array:
    """Return clip(factor * image + (1 - factor) * other, 0, 1), torchvision's blend."""
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image: Array, factor: Array) -> Array:
    """Scale the image towards black: clip(f * x, 0, 1)."""
    return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image: Array, factor: Array) -> Array:
    """Blend with the mean grey level: clip(f * x + (1 - f) * mean(gray(x)), 0, 1)."""
    mean_gray = jnp.mean(rgb_to_grayscale(image), axis=(-3, -2, -1), keepdims=True)
    return _blend(image, mean_gray, factor)


def adjust_saturation(image: Array, factor: Array) -> Array:
    """Blend with the grayscale image: clip(f * x + (1 - f) * gray(x), 0, 1). No-op for C = 1."""
    if image.shape[-1] == 1:
        return image
    return _blend(image, rgb_to_grayscale(image), factor)


def _floor_mod(x: Array, divisor: float) -> Array:
    """Return x - divisor * floor(x / divisor), in [0, divisor] up to rounding.

    jnp.mod gives the same values but lowers to fmod, which XLA on CPU does not vectorise. With
    jnp.mod the hue rotation of a 256 x 32 x 32 x 3 batch ran about 10 times slower on CPU.
    """
    return x - divisor * jnp.floor(x / divisor)


def rgb_to_hsv(image: Array) -> tuple[Array, Array, Array]:
    """Convert RGB [..., 3] in [0, 1] to (hue, saturation, value), each [...] in [0, 1].

    With V = max, c = max - min: S = c / V, and hue in sixths of a turn is (G - B) / c mod 6
    when R is the max, (B - R) / c + 2 when G is, else (R - G) / c + 4. Hue is 0 where c = 0,
    and S is 0 where V = 0.
    """
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    value = jnp.maximum(jnp.maximum(red, green), blue)
    minimum = jnp.minimum(jnp.minimum(red, green), blue)
    chroma = value - minimum
    saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)

    safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
    hue_if_red = _floor_mod((green - blue) / safe_chroma, 6.0)
    hue_if_green = (blue - red) / safe_chroma + 2.0
    hue_if_blue = (red - green) / safe_chroma + 4.0
    sextant = jnp.where(
        value == red, hue_if_red, jnp.where(value == green, hue_if_green, hue_if_blue)
    )
    hue = jnp.where(chroma > 0, sextant / 6.0, 0.0)
    return hue, saturation, value


def hsv_to_rgb(hue: Array, saturation: Array, value: Array) -> Array:
    """Convert (hue, saturation, value) in [0, 1] to RGB [..., 3].

    Uses the closed form channel_n = V - V * S * clip(min(k, 4 - k), 0, 1) with
    k = (n + 6 * hue) mod 6 and n = 5, 3, 1 for R, G, B.
    """
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = _floor_mod(n + 6.0 * hue, 6.0)
        channels.append(value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
    return jnp.stack(channels, axis=-1)


def adjust_hue(image: Array, shift: Array) -> Array:
    """Rotate the hue by `shift` turns in HSV space: hue' = (hue + shift) mod 1. No-op for C = 1."""
    if image.shape[-1] == 1:
        return image
    hue, saturation, value = rgb_to_hsv(image)
    return hsv_to_rgb(_floor_mod(hue + shift, 1.0), saturation, value)


def sample_jitter_params(
    key: Array, *, brightness: float, contrast: float, saturation: float, hue: float
) -> tuple[Array, Array]:
    """Sample ColorJitter's operation order and factors.

    Returns `order` and `factors`. `order` is a random permutation of (BRIGHTNESS, CONTRAST,
    SATURATION, HUE) in the order of application. `factors` is a float32 [4] indexed by
    operation. The brightness, contrast and saturation factors are ~ U(max(0, 1 - x), 1 + x),
    and the hue shift is ~ U(-h, h).
    """
    # One draw of 8 uniforms: 4 for the factors and 4 whose argsort is a uniformly random order.
    uniforms = jax.random.uniform(key, (8,))
    low = jnp.array(
        [max(0.0, 1.0 - brightness), max(0.0, 1.0 - contrast), max(0.0, 1.0 - saturation), -hue]
    )
    high = jnp.array([1.0 + brightness, 1.0 + contrast, 1.0 + saturation, hue])
    factors = low + (high - low) * uniforms[:4]
    order = jnp.argsort(uniforms[4:])
    return order, factors


def _blend_step(image: Array, operation: Array, factor: Array) -> Array:
    """Apply brightness, contrast or saturation (chosen by the traced `operation`) with `factor`.

    A factor of 1 leaves the image unchanged exactly, which is how a step is skipped.
    """
    gray = rgb_to_grayscale(image)
    mean_gray = jnp.mean(gray, keepdims=True)
    target = jnp.where(
        operation == BRIGHTNESS, 0.0, jnp.where(operation == CONTRAST, mean_gray, gray)
    )
    return _blend(image, target, factor)


def _check_jitter_strengths(
    brightness: float, contrast: float, saturation: float, hue: float
) -> None:
    strengths = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
    for name, strength in strengths.items():
        if strength < 0:
            raise ValueError(f"{name}={strength} is negative; use a jitter strength >= 0.")
    if not 0.0 <= hue <= 0.5:
        raise ValueError(
            f"hue={hue} is outside [0, 0.5]; a hue shift beyond half a turn is ambiguous."
        )


def color_jitter(
    key: Array,
    image: Array,
    *,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
) -> Array:
    """Apply torchvision ColorJitter: four operations in a random order, each clipped to [0, 1].

    The factors and order come from `sample_jitter_params`. Brightness, contrast and saturation
    are blends (see `adjust_brightness`, `adjust_contrast`, `adjust_saturation`), and hue rotates
    in HSV space (`adjust_hue`). For C = 1 only brightness and contrast apply.

    Under vmap, a lax.switch over the order would evaluate all four branches at each of the
    four positions, so four HSV round trips. Instead, the blends that come before hue in the
    order run first (the others get factor 1, which is an exact no-op), then hue runs once,
    then the blends that come after it. The result equals applying the four in order.
    """
    _check_image(image)
    _check_jitter_strengths(brightness, contrast, saturation, hue)
    image = to_float(image)
    order, factors = sample_jitter_params(
        key, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue
    )
    is_color = image.shape[-1] == 3
    if not is_color:
        factors = factors.at[SATURATION].set(1.0)
    hue_position = jnp.argmax(order == HUE)

    def blend_at(image: Array, position: int, active: Array) -> Array:
        operation = order[position]
        factor = jnp.where(active & (operation != HUE), factors[operation], 1.0)
        return _blend_step(image, operation, factor)

    # The last position never precedes the hue rotation and the first never follows it.
    for position in range(3):
        image = blend_at(image, position, position < hue_position)
    if is_color and hue > 0:
        # The barriers keep XLA from fusing the HSV round trip into the blends around it, which
        # would recompute it for each consumer. Without them the jitter ran about 1.5 times
        # slower on CPU and took twice as long to compile.
        image = jax.lax.optimization_barrier(image)
        image = jax.lax.optimization_barrier(adjust_hue(image, factors[HUE]))
    for position in range(1, 4):
        image = blend_at(image, position, position > hue_position)
    return image


def random_grayscale(key: Array, image: Array, p: float = 0.2) -> Array:
    """Replace each RGB channel by the luma with probability p, returning float32.

    A greyscale image (C = 1) is returned unchanged.
    """
    _check_image(image)
    _check_probability(p, "p")
    image = to_float(image)
    if image.shape[-1] == 1:
        return image
    apply = jax.random.bernoulli(key, p)
    gray = jnp.broadcast_to(rgb_to_grayscale(image), image.shape)
    return jnp.where(apply, gray, image)


# ----------------------------------------------------------------------------------------------
# Gaussian blur and normalisation
# ----------------------------------------------------------------------------------------------


def blur_radius(height: int, width: int, max_sigma: float) -> int:
    """Return the kernel radius ceil(3 * max_sigma), at most min(H, W) - 1 for reflect padding."""
    return max(0, min(math.ceil(3.0 * max_sigma), min(height, width) - 1))


def gaussian_kernel(sigma: Array, radius: int) -> Array:
    """Return the normalised 1-D Gaussian exp(-x^2 / (2 sigma^2)) / Z for x = -radius..radius."""
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * jnp.square(offsets / sigma))
    return weights / jnp.sum(weights)


def blur_matrix(kernel: Array, size: int) -> Array:
    """Return the [size, size] matrix B with (B @ x)[o] = sum_d kernel[d] * x[reflect(o + d - r)].

    r is the kernel radius and reflect mirrors about the border pixels, so that index -1 reads
    pixel 1 and index size reads pixel size - 2 (numpy's "reflect" mode). The radius must be
    below size.
    """
    radius = (kernel.shape[0] - 1) // 2
    source = np.arange(size)[:, None] + np.arange(-radius, radius + 1)[None, :]
    source = np.where(source < 0, -source, source)
    source = np.where(source > size - 1, 2 * (size - 1) - source, source)
    # one_hot[o, d, p] = 1 where output row o reads input row p through kernel tap d.
    one_hot = (source[:, :, None] == np.arange(size)[None, None, :]).astype(np.float32)
    return jnp.einsum("odp,d->op", one_hot, kernel, precision=jax.lax.Precision.HIGHEST)


def gaussian_blur(
    key: Array,
    image: Array,
    *,
    sigma: Sequence[float] = (0.1, 2.0),
    p: float = 0.5,
) -> Array:
    """Blur with a separable Gaussian of sigma ~ U(sigma) with probability p, returning float32.

    The kernel has a fixed radius of ceil(3 * max sigma) pixels, clamped to min(H, W) - 1, so
    the shape does not depend on the sampled sigma. Borders use reflect padding (torchvision's
    GaussianBlur mode): the pixel at -1 is the pixel at 1.
    """
    _check_image(image)
    _check_interval(sigma, "sigma", positive=True)
    _check_probability(p, "p")
    image = to_float(image)
    uniforms = jax.random.uniform(key, (2,))
    apply = uniforms[0] < p
    sampled_sigma = sigma[0] + (sigma[1] - sigma[0]) * uniforms[1]

    radius = blur_radius(image.shape[0], image.shape[1], sigma[1])
    kernel = gaussian_kernel(sampled_sigma, radius)
    # Two small matrix products instead of shifted sums: XLA on CPU would otherwise fuse the
    # preceding colour operations into each of the 2 * (2r + 1) shifted reads and recompute them.
    blurred = jnp.einsum(
        "oh,hwc,pw->opc",
        blur_matrix(kernel, image.shape[0]),
        image,
        blur_matrix(kernel, image.shape[1]),
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.where(apply, blurred, image)


def normalize(image: Array, mean: Sequence[float], std: Sequence[float]) -> Array:
    """Return (x - mean) / std per channel for an image [..., C] in [0, 1]."""
    channels = image.shape[-1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean={tuple(mean)} and std={tuple(std)} must have one value per channel, but the "
            f"image has {channels} channels (shape {tuple(image.shape)})."
        )
    if min(std) <= 0:
        raise ValueError(f"std={tuple(std)} contains a value <= 0; every std must be positive.")
    mean_array = jnp.asarray(mean, jnp.float32)
    std_array = jnp.asarray(std, jnp.float32)
    return (to_float(image) - mean_array) / std_array


# ----------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------


def strong_view(
    key: Array,
    image: Array,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float] = DEFAULT_CROP_SCALE,
) -> Array:
    """Build the strong view of one image as normalised float32 [size, size, C].

    RandomResizedCrop(scale) -> horizontal flip (p 0.5) -> colour jitter (0.4, 0.4, 0.4, 0.1)
    with p 0.8 -> grayscale (p 0.2) -> Gaussian blur with sigma ~ U(0.1, 2) and p 0.5 ->
    normalise.
    """
    key_crop, key_flip, key_apply_jitter, key_jitter, key_gray, key_blur = jax.random.split(key, 6)
    view = random_resized_crop(key_crop, image, size=size, scale=scale)
    view = horizontal_flip(key_flip, view)
    jittered = color_jitter(key_jitter, view, **STRONG_JITTER)
    view = jnp.where(jax.random.bernoulli(key_apply_jitter, STRONG_JITTER_P), jittered, view)
    view = random_grayscale(key_gray, view, p=STRONG_GRAYSCALE_P)
    view = gaussian_blur(key_blur, view, sigma=STRONG_BLUR_SIGMA, p=STRONG_BLUR_P)
    return normalize(view, mean, std)


def weak_view(
    key: Array,
    image: Array,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float] = DEFAULT_CROP_SCALE,
) -> Array:
    """Build the weak view of one image: RandomResizedCrop(scale) -> flip -> normalise.

    With scale=(0.08, 1.0) this is also the train-time augmentation of linear evaluation.
    """
    key_crop, key_flip = jax.random.split(key)
    view = random_resized_crop(key_crop, image, size=size, scale=scale)
    view = horizontal_flip(key_flip, view)
    return normalize(view, mean, std)


def eval_view(
    image: Array, *, size: int, mean: Sequence[float], std: Sequence[float]
) -> Array:
    """Resize [..., H, W, C] to float32 [..., size, size, C] if needed, then normalise.

    An image that already is size x size is only normalised. Any other image is resized whole
    (aspect ratio not kept) with antialiased bilinear weights.
    """
    if image.ndim < 3 or image.shape[-1] not in (1, 3):
        raise ValueError(
            f"image has shape {tuple(image.shape)}, but [..., H, W, C] with C in {{1, 3}} is "
            "expected."
        )
    _check_dtype(image, "image")
    _check_size(size)
    image = to_float(image)
    height, width = image.shape[-3], image.shape[-2]
    if (height, width) != (size, size):
        row_weights = interpolation_matrix(0, height, height, size)
        column_weights = interpolation_matrix(0, width, width, size)
        image = jnp.einsum(
            "oh,...hwc,pw->...opc",
            row_weights,
            image,
            column_weights,
            precision=jax.lax.Precision.HIGHEST,
        )
    return normalize(image, mean, std)


def augment_batch(
    key: Array, images: Array, view: Callable[..., Array], **kwargs: Any
) -> Array:
    """Apply `view` to every image of a [B, H, W, C] batch with its own key, giving [B, S, S, C].

    The key is split into B per-example keys and `view` (strong_view or weak_view) is vmapped
    with the keyword arguments `kwargs` (size, mean, std and optionally scale). uint8 images
    are converted to [0, 1] by dividing by 255.
    """
    if images.ndim != 4:
        raise ValueError(
            f"images has shape {tuple(images.shape)}, but a batch of shape [B, H, W, C] is "
            "expected."
        )
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0); pass at least one image.")
    _check_image(images[0], name="images[0]")
    images = to_float(images)
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda example_key, image: view(example_key, image, **kwargs))(keys, images)


# Target view by config name. The "strong target view" ablation selects "strong".
VIEWS: dict[str, Callable[..., Array]] = {"strong": strong_view, "weak": weak_view}
