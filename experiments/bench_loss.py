"""Benchmark the jitted ASCL loss and its query gradient against its matrix-product floor.

    python -m experiments.bench_loss [--n 4096,16384,65536] [--kinds normal,ahcl,ascl]
        [--repeats 5] [--batch 256] [--dim 128] [--num_neighbors 5]

For each bank size n and label rule it times, side by side in one process and interleaved:

- loss: ``jax.jit(jax.value_and_grad(losses.ascl_loss))`` w.r.t. the queries, with the targets
  and the bank as constants.
- reference: the same through ``soft_labels`` followed by ``soft_infonce`` (the straightforward
  composition that materialises the labels and log-probabilities).
- floor: only the matrix products the loss must do, jitted alone: the logits
  q . [k; bank]^T (the positive as a row-wise dot), the target similarities t . bank^T and
  the gradient product [B, n] @ bank. The "normal" rule needs no target similarities, but the
  floor keeps all three products for every rule.
- chunked floor: the same three products over column chunks of the bank in a lax.scan, so no
  [B, n] matrix is ever materialised. It is a stricter floor on machines where large temporary
  buffers are expensive.
- torch: the reference written in eager PyTorch, when torch is importable and can run on the
  device JAX uses (CPU, or CUDA when JAX runs on a GPU). The loss and gradient must agree with
  JAX to float32 tolerance; the table prints the largest differences.

Times are medians of --repeats runs after one warm-up call. Peak memory is the compiled
executable's memory_analysis(): temporary + output + argument bytes, printed in MiB and as a
multiple of one [B, n] float32 buffer. GFLOP/s counts the matrix products by hand:
2 * B * n * D floating-point operations per product (3 products; 2 for "normal", which skips
the target similarities in both the JAX loss and the torch version).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ascl_jax import losses

TAU = 0.1
TAU_PRIME = 0.05
FLOOR_CHUNK = 2048
HIGHEST = jax.lax.Precision.HIGHEST


def parse_int_list(text: str) -> list[int]:
    """Parse comma-separated integers, raising ArgumentTypeError for an empty or bad list."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} is empty; pass comma-separated integers")
    try:
        return [int(item) for item in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of integers; pass comma-separated integers such as 4096,16384"
        ) from None


def parse_kinds(text: str) -> list[str]:
    """Parse comma-separated label rules, raising ArgumentTypeError for an empty or bad one."""
    kinds = [item.strip() for item in text.split(",") if item.strip()]
    if not kinds:
        raise argparse.ArgumentTypeError(
            f"{text!r} is empty; pass some of {','.join(losses.KINDS)}"
        )
    for kind in kinds:
        if kind not in losses.KINDS:
            raise argparse.ArgumentTypeError(
                f"unknown label rule {kind!r}; pass some of {','.join(losses.KINDS)}"
            )
    return kinds


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser that reports an invalid argument as one line and exits with status 1."""

    def error(self, message: str):
        sys.exit(f"error: {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line, exiting with a one-line error for an invalid value."""
    parser = OneLineErrorParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=parse_int_list, default=[4096, 16384, 65536],
                        help="comma-separated bank sizes (number of queue entries)")
    parser.add_argument("--kinds", type=parse_kinds,
                        default=["normal", "ahcl", "ascl"],
                        help=f"comma-separated label rules, from {losses.KINDS}")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per variant after one warm-up run")
    parser.add_argument("--batch", type=int, default=256, help="batch size B")
    parser.add_argument("--dim", type=int, default=128, help="embedding size D")
    parser.add_argument("--num_neighbors", type=int, default=5, help="K of the label rules")
    parser.add_argument("--block_rows", type=int, default=None,
                        help="rows per block of the fused loss (default: its own choice)")
    parser.add_argument("--chunk_size", type=int, default=None,
                        help="bank entries per chunk of the fused loss (default: its own choice)")
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch version")
    parser.add_argument("--no_reference", action="store_true",
                        help="skip the straightforward JAX composition")
    args = parser.parse_args(argv)
    for name in ("repeats", "batch", "dim", "num_neighbors", "block_rows", "chunk_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"invalid --{name} {value}: it must be a positive integer")
    for bank_size in args.n:
        if bank_size < args.num_neighbors:
            parser.error(f"invalid --n {bank_size}: each bank size must be a positive integer "
                         f"of at least --num_neighbors ({args.num_neighbors})")
    return args


def make_inputs(batch: int, bank_size: int, dim: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Return L2-normalised float32 (query, target, bank) drawn from a seeded Gaussian."""
    rng = np.random.default_rng(seed)
    arrays = []
    for rows in (batch, batch, bank_size):
        x = rng.standard_normal((rows, dim)).astype(np.float32)
        arrays.append(x / np.linalg.norm(x, axis=-1, keepdims=True))
    return tuple(arrays)


# ---------------------------------------------------------------------------
# JAX variants. Each maps (query, target, bank) to (loss or a scalar, query-sized array).
# ---------------------------------------------------------------------------


def loss_variant(kind: str, num_neighbors: int, block_rows, chunk_size) -> Callable:
    loss_fn = functools.partial(
        losses.ascl_loss, kind=kind, num_neighbors=num_neighbors, tau=TAU, tau_prime=TAU_PRIME,
        block_rows=block_rows, chunk_size=chunk_size,
    )
    return jax.jit(jax.value_and_grad(loss_fn))


def reference_variant(kind: str, num_neighbors: int) -> Callable:
    def loss_fn(query, target, bank):
        labels, _ = losses.soft_labels(
            target, bank, kind=kind, num_neighbors=num_neighbors, tau_prime=TAU_PRIME
        )
        return losses.soft_infonce(query, target, bank, labels, tau=TAU)

    return jax.jit(jax.value_and_grad(loss_fn))


def _bank_products(rows, bank):
    return jax.lax.dot_general(rows, bank, (((1,), (1,)), ((), ())), precision=HIGHEST)


@jax.jit
def floor_products(query, target, bank):
    """Return the three products the loss needs, combined so that none is dead code."""
    positive = jnp.sum(query * target, axis=-1, keepdims=True)
    query_sims = _bank_products(query, bank)
    target_sims = _bank_products(target, bank)
    gradient = jnp.matmul(query_sims + target_sims, bank, precision=HIGHEST)
    return jnp.sum(positive), gradient + positive * target


@jax.jit
def chunked_floor_products(query, target, bank):
    """Return the products of floor_products, computed over column chunks of the bank.

    The bank size must be a multiple of FLOOR_CHUNK or smaller than it.
    """
    bank_size, dim = bank.shape
    chunk = min(FLOOR_CHUNK, bank_size)
    positive = jnp.sum(query * target, axis=-1, keepdims=True)

    def body(gradient, index):
        bank_chunk = jax.lax.dynamic_slice_in_dim(bank, index * chunk, chunk, axis=0)
        sims = _bank_products(jnp.concatenate([query, target]), bank_chunk)
        rows = query.shape[0]
        chunk_gradient = jnp.matmul(sims[:rows] + sims[rows:], bank_chunk, precision=HIGHEST)
        return gradient + chunk_gradient, None

    gradient, _ = jax.lax.scan(body, positive * target, jnp.arange(bank_size // chunk))
    return jnp.sum(positive), gradient


# ---------------------------------------------------------------------------
# PyTorch eager version, with the numerics of the JAX reference.
# ---------------------------------------------------------------------------


def torch_device_or_reason():
    """Return (torch module, device) to benchmark on, or (None, reason it is skipped)."""
    try:
        import torch
    except ImportError:
        return None, "torch is not importable"
    backend = jax.default_backend()
    if backend == "cpu":
        return torch, torch.device("cpu")
    if backend == "gpu" and torch.cuda.is_available():
        return torch, torch.device("cuda")
    return None, f"JAX runs on {backend} and torch has no device for it"


def torch_loss_and_gradient(torch, query, target, bank, *, kind, num_neighbors):
    """Return (loss, d loss / d query) of the ASCL loss computed in eager PyTorch."""
    bank_size = bank.shape[0]
    query = query.detach().requires_grad_(True)
    with torch.no_grad():
        batch = target.shape[0]
        if kind == "normal":
            bank_weights = torch.zeros((batch, bank_size), dtype=bank.dtype, device=bank.device)
        else:
            target_sims = target @ bank.T
            if kind in ("ahcl", "ascl"):
                log_q = torch.log_softmax(target_sims / TAU_PRIME, dim=1)
                q = log_q.exp()
                log_n = math.log(bank_size)
                kl = torch.where(q > 0, q * (log_q + log_n), torch.zeros_like(q)).sum(dim=1)
                confidence = (kl / log_n).clamp(0.0, 1.0) if bank_size > 1 else torch.ones_like(kl)
            if kind == "ascl":
                bank_weights = (confidence[:, None] * num_neighbors * q).clamp(max=1.0)
            else:
                neighbors = target_sims.topk(num_neighbors, dim=1).indices
                bank_weights = torch.zeros_like(target_sims).scatter_(1, neighbors, 1.0)
                if kind == "ahcl":
                    bank_weights = confidence[:, None] * bank_weights
        ones = torch.ones((batch, 1), dtype=bank.dtype, device=bank.device)
        labels = torch.cat([ones, bank_weights], dim=1)
        labels = labels / labels.sum(dim=1, keepdim=True)
    positive = (query * target).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, query @ bank.T], dim=1) / TAU
    loss = -(labels * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss.backward()
    return loss.detach(), query.grad


# ---------------------------------------------------------------------------
# Timing and reporting.
# ---------------------------------------------------------------------------


def time_interleaved(
    variants: dict[str, Callable], repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Return median wall-clock and process CPU seconds of each variant, timed round-robin.

    Each variant runs once as a warm-up first. CPU time sums all threads of this process, so
    on a CPU backend it is less disturbed than wall-clock time by other processes.
    """
    for run in variants.values():
        run()
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - wall_start)
            cpu[name].append(time.process_time() - cpu_start)
    return ({name: statistics.median(values) for name, values in wall.items()},
            {name: statistics.median(values) for name, values in cpu.items()})


def peak_bytes(jitted: Callable, *args) -> int | None:
    """Return temp + output + argument bytes of the compiled executable, or None if unknown."""
    analysis = jitted.lower(*args).compile().memory_analysis()
    if analysis is None:
        return None
    return (analysis.temp_size_in_bytes + analysis.output_size_in_bytes
            + analysis.argument_size_in_bytes)


def bench_one(args, bank_size: int, kind: str, torch_and_device) -> dict[str, object]:
    """Time every variant for one (n, kind); return one row of the table."""
    host_inputs = make_inputs(args.batch, bank_size, args.dim)
    inputs = tuple(jnp.asarray(x) for x in host_inputs)
    loss_fn = loss_variant(kind, args.num_neighbors, args.block_rows, args.chunk_size)
    jitted = {"loss": loss_fn, "floor": floor_products}
    if bank_size % FLOOR_CHUNK == 0 or bank_size < FLOOR_CHUNK:
        jitted["chunked"] = chunked_floor_products
    if not args.no_reference:
        jitted["reference"] = reference_variant(kind, args.num_neighbors)
    variants = {
        name: functools.partial(lambda fn: jax.block_until_ready(fn(*inputs)), fn)
        for name, fn in jitted.items()
    }

    torch, device = torch_and_device
    torch_inputs = None
    if torch is not None:
        torch_inputs = [torch.from_numpy(x).to(device) for x in host_inputs]

        def run_torch():
            result = torch_loss_and_gradient(
                torch, *torch_inputs, kind=kind, num_neighbors=args.num_neighbors
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            return result

        variants["torch"] = run_torch

    medians, cpu_medians = time_interleaved(variants, args.repeats)

    loss, gradient = loss_fn(*inputs)
    row = {"n": bank_size, "kind": kind, **medians,
           "peak": peak_bytes(loss_fn, *inputs),
           "products": 2 if kind == "normal" else 3,
           "cpu": cpu_medians}
    if torch is not None:
        torch_loss, torch_gradient = run_torch()
        row["loss_diff"] = abs(float(loss) - float(torch_loss.cpu()))
        row["grad_diff"] = float(np.max(np.abs(
            np.asarray(gradient) - torch_gradient.cpu().numpy()
        )))
        row["grad_scale"] = float(np.max(np.abs(np.asarray(gradient))))
        row["loss_value"] = float(loss)
    return row


def format_table(rows: list[dict[str, object]], batch: int, dim: int) -> str:
    header = ("| n | kind | loss ms | floor ms | loss/floor | chunked floor ms | loss/chunked "
              "| reference ms | reference/loss | torch ms | torch/loss | peak MiB "
              "| peak / [B,n] f32 | loss GFLOP/s | max abs diff torch (loss, grad) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def ms(row, name):
        return f"{1e3 * row[name]:.1f}" if name in row else "-"

    def ratio(row, numerator, denominator):
        if numerator in row and denominator in row:
            return f"{row[numerator] / row[denominator]:.2f}"
        return "-"

    for row in rows:
        buffer_bytes = batch * row["n"] * 4
        peak = row["peak"]
        peak_text = "-" if peak is None else f"{peak / 2**20:.1f}"
        peak_ratio = "-" if peak is None else f"{peak / buffer_bytes:.2f}"
        flops = row["products"] * 2.0 * batch * row["n"] * dim
        diff = "-"
        if "loss_diff" in row:
            diff = f"{row['loss_diff']:.1e}, {row['grad_diff']:.1e}"
        lines.append(
            f"| {row['n']} | {row['kind']} | {ms(row, 'loss')} | {ms(row, 'floor')} "
            f"| {ratio(row, 'loss', 'floor')} | {ms(row, 'chunked')} "
            f"| {ratio(row, 'loss', 'chunked')} | {ms(row, 'reference')} "
            f"| {ratio(row, 'reference', 'loss')} | {ms(row, 'torch')} "
            f"| {ratio(row, 'torch', 'loss')} | {peak_text} | {peak_ratio} "
            f"| {flops / row['loss'] / 1e9:.1f} | {diff} |"
        )
    return "\n".join(lines)


def format_cpu_table(rows: list[dict[str, object]]) -> str:
    """Return a table of the median process CPU times, all threads summed, in ms."""
    names = [name for name in ("loss", "floor", "chunked", "reference", "torch")
             if name in rows[0]["cpu"]]
    header = ("| n | kind | " + " | ".join(f"{name} CPU ms" for name in names)
              + " | loss/floor | loss/chunked | torch/loss |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        cpu = row["cpu"]

        def ratio(numerator, denominator, cpu=cpu):
            if numerator in cpu and denominator in cpu:
                return f"{cpu[numerator] / cpu[denominator]:.2f}"
            return "-"

        cells = " | ".join(f"{1e3 * cpu[name]:.1f}" for name in names)
        lines.append(f"| {row['n']} | {row['kind']} | {cells} | {ratio('loss', 'floor')} "
                     f"| {ratio('loss', 'chunked')} | {ratio('torch', 'loss')} |")
    return "\n".join(lines)


def check_agreement(rows: list[dict[str, object]]) -> list[str]:
    """Return a message for each row where torch and JAX differ beyond float32 tolerance."""
    problems = []
    for row in rows:
        if "loss_diff" not in row:
            continue
        loss_tolerance = 1e-5 * max(1.0, abs(row["loss_value"]))
        grad_tolerance = 1e-4 * max(row["grad_scale"], 1e-30)
        if row["loss_diff"] > loss_tolerance or row["grad_diff"] > grad_tolerance:
            problems.append(
                f"n={row['n']} kind={row['kind']}: torch and JAX differ by "
                f"{row['loss_diff']:.2e} in the loss (tolerance {loss_tolerance:.1e}) and "
                f"{row['grad_diff']:.2e} in the gradient (tolerance {grad_tolerance:.1e})"
            )
    return problems


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch_and_device = (None, "--no_torch")
    if not args.no_torch:
        torch_and_device = torch_device_or_reason()
    torch, device = torch_and_device
    print(f"JAX {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
          f"B={args.batch}, D={args.dim}, K={args.num_neighbors}, tau={TAU}, "
          f"tau'={TAU_PRIME}, float32, {args.repeats} timed runs per variant")
    if torch is None:
        print(f"torch skipped: {device}")
    else:
        print(f"torch {torch.__version__} eager on {device}, {torch.get_num_threads()} threads")

    rows = []
    for bank_size in args.n:
        for kind in args.kinds:
            rows.append(bench_one(args, bank_size, kind, torch_and_device))
            print(f"done n={bank_size} kind={kind}", flush=True)

    print()
    print(format_table(rows, args.batch, args.dim))
    if jax.default_backend() == "cpu":
        print()
        print(format_cpu_table(rows))
    print()
    print("Times are medians in ms (wall clock; the CPU table sums the CPU time of all "
          "threads). Peak = temp + output + argument bytes of the compiled loss "
          "(memory_analysis()). GFLOP/s counts the matrix products by hand.")
    problems = check_agreement(rows)
    for problem in problems:
        print("MISMATCH:", problem)
    if torch is not None and not problems:
        print("torch and JAX agree to float32 tolerance on every row.")


if __name__ == "__main__":
    main()
