"""Time the ASCL train step in JAX against the same step in eager PyTorch, in one process.

Usage:
    python -m experiments.bench_train [--batch_sizes=64,256] [--dtypes=float32,bfloat16]
        [--steps=3] [--repeats=5] [--width=64] [--notorch] [--noplatform_defaults]

The JAX step is the real one: `train_step.make_train_step` wrapped by
`sharding.shard_train_step` on a one-device mesh, as `ascl_jax.train` builds it. It augments
both views on the device, runs the online forward and backward pass and the target (EMA)
forward pass with shuffle BN, computes the soft labels, the loss and the metrics, and applies
the SGD, EMA and enqueue updates. Its input is a batch of random uint8 images.

The PyTorch step does the same work with eager tensor ops on the batch:

- the same ResNet (CIFAR stem), split BatchNorm and Linear-ReLU-Linear projector;
- the same views: RandomResizedCrop with antialiased bilinear weights, flip, colour jitter
  (p 0.8), grayscale (p 0.2), Gaussian blur (p 0.5) and normalisation for the query, crop and
  flip for the target. Three details differ. The crop box comes from one attempt clamped to
  the image instead of ten attempts with a central fallback. The colour-jitter operations run
  in one random order per batch instead of one per example. Split BN uses interleaved groups
  (example n in group n mod G, the layout of the MoCo CIFAR code, which needs no copy) instead
  of contiguous ones;
- EMA of the parameters, shuffle BN on the target side, the ASCL soft labels and the soft
  InfoNCE loss, SGD with momentum and coupled weight decay, enqueue, and the loss, confidence,
  gradient-norm and parameter-norm metrics. It leaves out the three class-agreement
  diagnostics, which are small matrix reductions next to the convolutions.

Each (batch size, dtype) runs warm-up steps, then `--repeats` rounds that alternate the two
frameworks, each round timing `--steps` steps of each. The table shows the median over all
timed steps, images per second and the ratio of the JAX to the PyTorch images per second, so
load from other processes hits both frameworks alike. The PyTorch bfloat16 step runs under
`torch.autocast("cpu", dtype=torch.bfloat16)`.

The achieved FLOP/s uses the floating-point operation count of the compiled JAX step from
XLA's `cost_analysis()`. MFU is that rate over the device's nominal dense peak for the dtype,
from `PEAK_FLOPS`. CPUs and device kinds missing from that table show n/a.
"""

import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import app, flags

from experiments import cli

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["64", "256"], "Global batch sizes to time.")
_DTYPES = flags.DEFINE_list(
    "dtypes", ["float32", "bfloat16"], "Computation dtypes to time (float32, bfloat16)."
)
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per framework in each round.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Rounds that alternate the two frameworks.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per framework after compilation.")
_MODEL = flags.DEFINE_string(
    "model", "resnet18", "ResNet: resnet10, resnet18 or resnet34 (resnet50 needs --notorch)."
)
_WIDTH = flags.DEFINE_integer("width", 64, "Base width of the ResNet.")
_HIDDEN_DIM = flags.DEFINE_integer("hidden_dim", 2048, "Hidden size of the projector.")
_PROJECTION_DIM = flags.DEFINE_integer("projection_dim", 128, "Output size of the projector.")
_BN_GROUPS = flags.DEFINE_integer("bn_groups", 8, "Split BatchNorm groups.")
_QUEUE_SIZE = flags.DEFINE_integer("queue_size", 4096, "Queue length n; a multiple of the batch.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Side of the square input images.")
_TORCH = flags.DEFINE_boolean("torch", True, "Time the eager PyTorch step beside the JAX one.")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "PyTorch intra-op threads; 0 keeps PyTorch's default."
)
_PLATFORM_DEFAULTS = flags.DEFINE_boolean(
    "platform_defaults", True,
    "Apply ascl_jax.platform's XLA flags before JAX starts, as the training entry point does.",
)

# Basic blocks per stage of the ResNets that the PyTorch step implements.
TORCH_STAGES = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
# The CIFAR-stem ResNets halve the side in three stride-2 stages, so the last feature map has
# side ceil(image_size / 8). Apart from the BatchNorm case in check_settings, any image_size of
# 1 or more runs in both steps (tiny runs with sides 1 and 2 completed on a CPU).
FEATURE_MAP_STRIDE = 8

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)

# Nominal dense peak FLOP/s by (device_kind prefix, dtype), as the vendors publish them.
# NOTE: nominal figures, not measured here. The GPU float32 entries are the plain FP32 rate
# without TF32 tensor cores. TPUs publish no separate float32 peak, so they have none here.
PEAK_FLOPS: dict[tuple[str, str], float] = {
    ("TPU v4", "bfloat16"): 275e12,
    ("TPU v5 lite", "bfloat16"): 197e12,
    ("TPU v5e", "bfloat16"): 197e12,
    ("TPU v5p", "bfloat16"): 459e12,
    ("TPU v5", "bfloat16"): 459e12,
    ("TPU v6 lite", "bfloat16"): 918e12,
    ("TPU v6e", "bfloat16"): 918e12,
    ("NVIDIA A100", "bfloat16"): 312e12,
    ("NVIDIA A100", "float32"): 19.5e12,
    ("NVIDIA H100", "bfloat16"): 989e12,
    ("NVIDIA H100", "float32"): 67e12,
    ("NVIDIA H200", "bfloat16"): 989e12,
    ("NVIDIA H200", "float32"): 67e12,
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Return the nominal peak FLOP/s of `device_kind` for `dtype`, or None when unknown."""
    matches = [
        (len(prefix), peak) for (prefix, peak_dtype), peak in PEAK_FLOPS.items()
        if peak_dtype == dtype and device_kind.startswith(prefix)
    ]
    return max(matches)[1] if matches else None


def step_config(batch_size: int, dtype: str) -> dict[str, Any]:
    """Return the CIFAR ResNet-18 reference settings, resized by the command-line flags."""
    from experiments.configs import cifar10

    config = cifar10.get_config()
    config.model = _MODEL.value
    config.width = _WIDTH.value
    config.hidden_dim = _HIDDEN_DIM.value
    config.projection_dim = _PROJECTION_DIM.value
    config.bn_groups = _BN_GROUPS.value
    config.queue_size = _QUEUE_SIZE.value
    config.image_size = _IMAGE_SIZE.value
    config.batch_size = batch_size
    config.compute_dtype = dtype
    return config.to_dict()


def parse_batch_sizes(values: list[str]) -> list[int]:
    """Return the integers of --batch_sizes, raising ValueError for an empty or bad list."""
    if not values:
        raise ValueError("invalid --batch_sizes=: it is empty; pass batch sizes such as 64,256.")
    try:
        return [int(value) for value in values]
    except ValueError:
        raise ValueError(f"invalid --batch_sizes={','.join(values)}: pass comma-separated "
                         "integers such as 64,256.") from None


def check_settings(batch_sizes: list[int], dtypes: list[str]) -> None:
    """Raise ValueError for a setting that the step would reject later, before JAX starts."""
    if not dtypes:
        raise ValueError("invalid --dtypes=: it is empty; pass float32, bfloat16 or both.")
    for dtype in dtypes:
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"invalid dtype {dtype!r} in --dtypes: use float32 or bfloat16.")
    if _TORCH.value and _MODEL.value not in TORCH_STAGES:
        raise ValueError(
            f"invalid --model={_MODEL.value}: the PyTorch step implements "
            f"{', '.join(TORCH_STAGES)}; pass one of them, or --notorch to time JAX alone."
        )
    for name, value in (("steps", _STEPS.value), ("repeats", _REPEATS.value),
                        ("width", _WIDTH.value), ("hidden_dim", _HIDDEN_DIM.value),
                        ("projection_dim", _PROJECTION_DIM.value),
                        ("bn_groups", _BN_GROUPS.value), ("queue_size", _QUEUE_SIZE.value),
                        ("image_size", _IMAGE_SIZE.value)):
        if value < 1:
            raise ValueError(f"invalid --{name}={value}: it must be a positive integer.")
    for name, value in (("warmup", _WARMUP.value), ("torch_threads", _TORCH_THREADS.value)):
        if value < 0:
            raise ValueError(f"invalid --{name}={value}: it must be 0 or more.")
    for batch_size in batch_sizes:
        if batch_size < 1 or batch_size % _BN_GROUPS.value:
            raise ValueError(
                f"invalid batch size {batch_size} in --batch_sizes: it must be a positive "
                f"multiple of --bn_groups={_BN_GROUPS.value}."
            )
        if _QUEUE_SIZE.value % batch_size:
            raise ValueError(
                f"invalid batch size {batch_size} for --queue_size={_QUEUE_SIZE.value}: the "
                "queue length must be a multiple of the batch size."
            )
        # PyTorch's training-mode BatchNorm rejects a group with one value per channel, which
        # happens in the last stage with one example per group and a 1x1 feature map.
        one_value_per_group = (batch_size == _BN_GROUPS.value
                               and _IMAGE_SIZE.value <= FEATURE_MAP_STRIDE)
        if _TORCH.value and one_value_per_group:
            raise ValueError(
                f"invalid --image_size={_IMAGE_SIZE.value} for batch size {batch_size} and "
                f"--bn_groups={_BN_GROUPS.value}: the PyTorch BatchNorm needs more than one "
                f"example per group or an image side above {FEATURE_MAP_STRIDE}; pass a larger "
                "batch or image size, or --notorch."
            )


def check_model() -> None:
    """Raise ValueError unless --model names a ResNet of ascl_jax.models (imports JAX)."""
    from ascl_jax import models

    if _MODEL.value not in models.MODELS:
        raise ValueError(f"invalid --model={_MODEL.value}: use one of "
                         f"{', '.join(models.MODELS)}.")


# ----------------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------------


class JaxStep:
    """The library's sharded train step on one device, with its state and a fixed batch."""

    def __init__(self, config: dict[str, Any], images: np.ndarray, labels: np.ndarray):
        import jax

        from ascl_jax import models, sharding
        from ascl_jax import train_state as state_lib
        from ascl_jax import train_step as step_lib

        mesh = sharding.create_mesh(jax.devices()[:1])
        model = models.create_encoder(
            config["model"], width=config["width"], stem=config["stem"],
            bn_groups=config["bn_groups"], hidden_dim=config["hidden_dim"],
            projection_dim=config["projection_dim"],
            dtype=models.compute_dtype(config["compute_dtype"]),
        )
        schedule = state_lib.learning_rate_schedule(
            config["learning_rate"], warmup_steps=0, total_steps=1000
        )
        tx = state_lib.make_optimizer(
            schedule, momentum=config["momentum"], weight_decay=config["weight_decay"]
        )
        image_shape = images.shape[1:]

        def create_state():
            return state_lib.create_train_state(
                jax.random.PRNGKey(0), model, image_shape=image_shape, tx=tx,
                queue_size=config["queue_size"], projection_dim=config["projection_dim"],
            )

        self.state = sharding.create_sharded_state(create_state, mesh)
        self.step_fn = sharding.shard_train_step(
            step_lib.make_train_step(config, model, schedule, mean=MEAN, std=STD,
                                     axis_name=sharding.DATA_AXIS),
            mesh, self.state,
        )
        self.batch = sharding.global_batch(mesh, images, labels, batch_size=images.shape[0])

        started = time.perf_counter()
        compiled = self.step_fn.lower(self.state, *self.batch).compile()
        self.compile_seconds = time.perf_counter() - started
        self.flops = _cost_flops(compiled)
        self.device_kind = jax.devices()[0].device_kind
        self.platform = jax.devices()[0].platform

    def run(self) -> float:
        """Run one step and return its wall time in seconds, waiting for the results."""
        import jax

        started = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, *self.batch)
        jax.block_until_ready((self.state, metrics))
        self.metrics = metrics
        return time.perf_counter() - started


def _cost_flops(compiled: Any) -> float | None:
    """Return the "flops" entry of XLA's cost analysis, or None when the backend gives none."""
    try:
        analysis = compiled.cost_analysis()
    except NotImplementedError:
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


# ----------------------------------------------------------------------------------------------
# PyTorch
# ----------------------------------------------------------------------------------------------


def build_torch_step(config: dict[str, Any], images: np.ndarray) -> Callable[[], float]:
    """Return `run()` that times one eager PyTorch step on `images` (uint8 [B, H, W, C])."""
    import torch

    torch.manual_seed(0)
    model = _torch_encoder(config)
    target_model = _torch_encoder(config)
    target_model.load_state_dict(model.state_dict())
    for parameter in target_model.parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config["learning_rate"], momentum=config["momentum"],
        weight_decay=config["weight_decay"],
    )
    online_params = list(model.parameters())
    target_params = list(target_model.parameters())
    queue = torch.nn.functional.normalize(
        torch.randn(config["queue_size"], config["projection_dim"]), dim=1
    )
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    batch_size = batch.shape[0]
    state = {"pointer": 0}
    use_bf16 = config["compute_dtype"] == "bfloat16"
    size = config["image_size"]

    def encode(network: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            projection = network(inputs)
        return torch.nn.functional.normalize(projection.float(), dim=1)

    def step() -> dict[str, torch.Tensor]:
        # EMA update of the target parameters.
        with torch.no_grad():
            torch._foreach_lerp_(target_params, online_params, 1.0 - config["ema_momentum"])

        # Both views; the target side on a shuffled batch, unshuffled after.
        query_view = _torch_strong_view(batch, size)
        order = torch.randperm(batch_size)
        target_view = _torch_weak_view(batch[order], size)
        with torch.no_grad():
            target = encode(target_model, target_view)[torch.argsort(order)]
            labels, confidence = _torch_soft_labels(
                target, queue, config["num_neighbors"], config["tau_prime"]
            )

        # Loss and SGD update of the online network.
        query = encode(model, query_view)
        loss = _torch_soft_infonce(query, target, queue, labels, config["tau"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            grad_norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in online_params])
            )
        optimizer.step()

        # Enqueue.
        pointer = state["pointer"]
        queue[pointer:pointer + batch_size] = target
        state["pointer"] = (pointer + batch_size) % queue.shape[0]
        with torch.no_grad():
            param_norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p) for p in online_params])
            )
        return {"loss": loss.detach(), "confidence": confidence.mean(),
                "grad_norm": grad_norm, "param_norm": param_norm}

    def run() -> float:
        started = time.perf_counter()
        metrics = step()
        float(metrics["loss"])
        return time.perf_counter() - started

    return run


def _torch_encoder(config: dict[str, Any]):
    """Build the PyTorch ResNet (CIFAR stem) with split BatchNorm and the projector."""
    import torch
    from torch import nn
    from torch.nn import functional

    groups = config["bn_groups"]

    class SplitBatchNorm(nn.BatchNorm2d):
        """BatchNorm over `groups` interleaved groups of the batch in training mode."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                return super().forward(x)
            n, c, h, w = x.shape
            running_mean = self.running_mean.repeat(groups)
            running_var = self.running_var.repeat(groups)
            y = functional.batch_norm(
                x.reshape(n // groups, c * groups, h, w), running_mean, running_var,
                self.weight.repeat(groups), self.bias.repeat(groups), True, self.momentum,
                self.eps,
            ).reshape(n, c, h, w)
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(groups, c).mean(0))
                self.running_var.copy_(running_var.view(groups, c).mean(0))
            return y

    def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
            SplitBatchNorm(out_channels),
        )

    class BasicBlock(nn.Module):
        def __init__(self, in_channels: int, out_channels: int, stride: int):
            super().__init__()
            self.conv_bn1 = conv_bn(in_channels, out_channels, 3, stride)
            self.conv_bn2 = conv_bn(out_channels, out_channels, 3, 1)
            self.shortcut = (conv_bn(in_channels, out_channels, 1, stride)
                             if stride != 1 or in_channels != out_channels else nn.Identity())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = functional.relu(self.conv_bn1(x))
            return functional.relu(self.conv_bn2(y) + self.shortcut(x))

    stages = TORCH_STAGES
    if config["model"] not in stages or config["stem"] != "cifar":
        raise ValueError(
            f"The PyTorch step implements resnet10/18/34 with the cifar stem, not "
            f"{config['model']} with stem {config['stem']}; pass --notorch to time JAX alone."
        )
    width = config["width"]
    layers: list[nn.Module] = [conv_bn(3, width, 3, 1), nn.ReLU()]
    in_channels = width
    for stage, num_blocks in enumerate(stages[config["model"]]):
        for index in range(num_blocks):
            out_channels = width * 2**stage
            layers.append(BasicBlock(in_channels, out_channels,
                                     2 if stage > 0 and index == 0 else 1))
            in_channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(in_channels, config["hidden_dim"]), nn.ReLU(),
               nn.Linear(config["hidden_dim"], config["projection_dim"])]
    return nn.Sequential(*layers).train()


def _torch_interpolation(start, length, in_size: int, out_size: int):
    """Return [B, out_size, in_size] antialiased bilinear weights, as augment's formula."""
    import torch

    step = length / out_size
    support = torch.clamp(step, min=1.0)
    centres = start[:, None] + (torch.arange(out_size) + 0.5)[None, :] * step[:, None]
    pixels = torch.arange(in_size) + 0.5
    distance = (pixels[None, None, :] - centres[:, :, None]).abs()
    weights = torch.clamp(1.0 - distance / support[:, None, None], min=0.0)
    inside = (pixels[None, :] >= start[:, None]) & (pixels[None, :] < (start + length)[:, None])
    weights = weights * inside[:, None, :]
    return weights / weights.sum(dim=2, keepdim=True)


def _torch_crop_flip(batch, size: int):
    """Crop a random box of each image (one clamped attempt), resize, flip: float [B, C, S, S]."""
    import torch

    images = batch.float() / 255.0
    count, _, height, width = images.shape
    area = (0.2 + 0.8 * torch.rand(count)) * height * width
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(count)
    crop_width = torch.sqrt(area * torch.exp(log_ratio)).round().clamp(1, width)
    crop_height = torch.sqrt(area / torch.exp(log_ratio)).round().clamp(1, height)
    top = torch.floor(torch.rand(count) * (height - crop_height + 1))
    left = torch.floor(torch.rand(count) * (width - crop_width + 1))
    rows = _torch_interpolation(top, crop_height, height, size)
    columns = _torch_interpolation(left, crop_width, width, size)
    views = torch.einsum("boh,bchw,bpw->bcop", rows, images, columns)
    flip = torch.rand(count) < 0.5
    return torch.where(flip[:, None, None, None], views.flip(-1), views)


def _torch_gray(images):
    return (0.299 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3])


def _torch_hue(images, shift):
    """Rotate the hue of RGB images [B, 3, H, W] by `shift` [B] turns."""
    import torch

    red, green, blue = images.unbind(1)
    value, _ = images.max(1)
    minimum, _ = images.min(1)
    chroma = value - minimum
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), 0.0)
    safe = chroma.clamp(min=1e-12)
    hue = torch.where(
        value == red, (green - blue) / safe,
        torch.where(value == green, 2.0 + (blue - red) / safe, 4.0 + (red - green) / safe),
    )
    hue = torch.where(chroma > 0, torch.remainder(hue / 6.0, 1.0), 0.0)
    hue = torch.remainder(hue + shift[:, None, None], 1.0)
    channel = torch.tensor([5.0, 3.0, 1.0])[None, :, None, None]
    k = torch.remainder(channel + hue[:, None] * 6.0, 6.0)
    weight = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return value[:, None] - value[:, None] * saturation[:, None] * weight


def _torch_strong_view(batch, size: int):
    """Crop, flip, colour jitter (p 0.8), grayscale (p 0.2), blur (p 0.5), normalise."""
    import torch

    views = _torch_crop_flip(batch, size)
    count = views.shape[0]
    factor = lambda low, high: (low + (high - low) * torch.rand(count))[:, None, None, None]  # noqa: E731
    jittered = views
    for operation in torch.randperm(4).tolist():
        if operation == 0:
            jittered = (jittered * factor(0.6, 1.4)).clamp(0, 1)
        elif operation == 1:
            grey = _torch_gray(jittered).mean(dim=(1, 2, 3), keepdim=True)
            f = factor(0.6, 1.4)
            jittered = (f * jittered + (1 - f) * grey).clamp(0, 1)
        elif operation == 2:
            f = factor(0.6, 1.4)
            jittered = (f * jittered + (1 - f) * _torch_gray(jittered)).clamp(0, 1)
        else:
            jittered = _torch_hue(jittered, -0.1 + 0.2 * torch.rand(count))
    apply_jitter = (torch.rand(count) < 0.8)[:, None, None, None]
    views = torch.where(apply_jitter, jittered, views)
    to_gray = (torch.rand(count) < 0.2)[:, None, None, None]
    views = torch.where(to_gray, _torch_gray(views).expand_as(views), views)

    # Separable Gaussian blur with reflect borders, as matrices [B, S, S] per example.
    radius = max(0, min(math.ceil(3.0 * 2.0), size - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    sigma = 0.1 + 1.9 * torch.rand(count)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    source = np.arange(size)[:, None] + np.arange(-radius, radius + 1)[None, :]
    source = np.abs(source)
    source = np.where(source > size - 1, 2 * (size - 1) - source, source)
    one_hot = torch.from_numpy(
        (source[:, :, None] == np.arange(size)[None, None, :]).astype(np.float32)
    )
    blur = torch.einsum("odp,bd->bop", one_hot, kernel)
    blurred = torch.einsum("boh,bchw,bpw->bcop", blur, views, blur)
    views = torch.where((torch.rand(count) < 0.5)[:, None, None, None], blurred, views)
    return _torch_normalize(views)


def _torch_weak_view(batch, size: int):
    return _torch_normalize(_torch_crop_flip(batch, size))


def _torch_normalize(views):
    import torch

    mean = torch.tensor(MEAN)[None, :, None, None]
    std = torch.tensor(STD)[None, :, None, None]
    return (views - mean) / std


def _torch_soft_labels(target, queue, num_neighbors: int, tau_prime: float):
    """Return ASCL labels [B, 1 + n] and confidences [B] (see ascl_jax.losses)."""
    import torch

    log_q = torch.log_softmax(target @ queue.T / tau_prime, dim=1)
    q = log_q.exp()
    confidence = 1.0 + (q * log_q).sum(1) / math.log(queue.shape[0])
    bank_weights = torch.clamp(confidence[:, None] * num_neighbors * q, max=1.0)
    labels = torch.cat([torch.ones_like(confidence)[:, None], bank_weights], dim=1)
    return labels / labels.sum(1, keepdim=True), confidence


def _torch_soft_infonce(query, target, queue, labels, tau: float):
    import torch

    logits = torch.cat([(query * target).sum(1, keepdim=True), query @ queue.T], dim=1) / tau
    return -(labels * torch.log_softmax(logits, dim=1)).sum(1).mean()


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def time_interleaved(runners: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Warm up each runner, then alternate them for the rounds; return all timed seconds."""
    for run in runners.values():
        for _ in range(_WARMUP.value):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(_REPEATS.value):
        # Alternate which framework goes first, so neither always follows the other.
        names = list(runners) if round_index % 2 == 0 else list(reversed(runners))
        for name in names:
            times[name].extend(runners[name]() for _ in range(_STEPS.value))
    return times


def _format_rate(value: float | None, unit: float = 1e9) -> str:
    return "n/a" if value is None else f"{value / unit:.1f}"


def main(argv: list[str]) -> None:
    cli.reject_arguments(argv)
    dtypes = list(_DTYPES.value)
    try:
        batch_sizes = parse_batch_sizes(_BATCH_SIZES.value)
        check_settings(batch_sizes, dtypes)
    except ValueError as error:
        sys.exit(f"error: {error}")

    # XLA reads its flags when JAX starts its backend, so they go in before JAX is imported.
    if _PLATFORM_DEFAULTS.value:
        from ascl_jax import platform

        platform.apply_platform_defaults()
    import jax

    try:
        check_model()
    except ValueError as error:
        sys.exit(f"error: {error}")

    torch = None
    if _TORCH.value:
        try:
            import torch
        except ImportError:
            print("note: PyTorch is not importable, so only the JAX step is timed.")
    if torch is not None and _TORCH_THREADS.value > 0:
        torch.set_num_threads(_TORCH_THREADS.value)

    device = jax.devices()[0]
    print(f"JAX {jax.__version__} on {device.platform} ({device.device_kind}), "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if torch is not None:
        print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{_MODEL.value} width {_WIDTH.value}, projector {_HIDDEN_DIM.value}-"
          f"{_PROJECTION_DIM.value}, bn_groups {_BN_GROUPS.value}, queue {_QUEUE_SIZE.value}, "
          f"{_IMAGE_SIZE.value}x{_IMAGE_SIZE.value} images; median of "
          f"{_STEPS.value} x {_REPEATS.value} steps after {_WARMUP.value} warm-up steps")

    rows = []
    for batch_size in batch_sizes:
        rng = np.random.default_rng(batch_size)
        images = rng.integers(0, 256, (batch_size, _IMAGE_SIZE.value, _IMAGE_SIZE.value, 3),
                              dtype=np.uint8)
        labels = rng.integers(0, 10, batch_size).astype(np.int32)
        for dtype in dtypes:
            config = step_config(batch_size, dtype)
            jax_step = JaxStep(config, images, labels)
            runners = {"jax": jax_step.run}
            if torch is not None:
                runners["torch"] = build_torch_step(config, images)
            times = time_interleaved(runners)
            medians = {name: statistics.median(seconds) for name, seconds in times.items()}
            loss = float(jax_step.metrics["loss"])
            if not math.isfinite(loss):
                sys.exit(f"error: the JAX step gave a non-finite loss {loss} at batch "
                         f"{batch_size}, {dtype}.")
            flops_per_second = (None if jax_step.flops is None
                                else jax_step.flops / medians["jax"])
            peak = None if jax_step.platform == "cpu" else peak_flops(jax_step.device_kind, dtype)
            rows.append((batch_size, dtype, medians, jax_step, flops_per_second, peak))
            print(f"  batch {batch_size} {dtype}: compiled in {jax_step.compile_seconds:.1f} s, "
                  f"JAX loss {loss:.4f}", flush=True)

    print()
    print(f"{'batch':>5} {'dtype':>8} {'JAX ms':>8} {'JAX img/s':>9} {'torch ms':>9} "
          f"{'torch img/s':>11} {'JAX/torch':>9} {'GFLOP/step':>10} {'GFLOP/s':>8} {'MFU':>6}")
    for batch_size, dtype, medians, jax_step, flops_per_second, peak in rows:
        jax_rate = batch_size / medians["jax"]
        if "torch" in medians:
            torch_ms = f"{1000 * medians['torch']:.0f}"
            torch_rate = batch_size / medians["torch"]
            torch_rate_text = f"{torch_rate:.1f}"
            ratio = f"{jax_rate / torch_rate:.2f}"
        else:
            torch_ms = torch_rate_text = ratio = "n/a"
        mfu = "n/a" if peak is None or flops_per_second is None else (
            f"{100 * flops_per_second / peak:.1f}%")
        print(f"{batch_size:>5} {dtype:>8} {1000 * medians['jax']:>8.0f} {jax_rate:>9.1f} "
              f"{torch_ms:>9} {torch_rate_text:>11} {ratio:>9} "
              f"{_format_rate(jax_step.flops):>10} {_format_rate(flops_per_second):>8} {mfu:>6}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
