"""Invalid flags of the three benchmarks: one `error: ...` line and status 1, before any work.

Every case here fails during the flag checks, so no benchmark starts and each takes a second
or two. The absl tools run in a subprocess because their flags are process-wide.
"""

import ast
import os
import subprocess
import sys

import pytest

from experiments import bench_input, bench_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_module(module: str, *args: str, env_update: dict | None = None):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("ASCL_JAX_CIFAR10_DIR", None)
    env.update(env_update or {})
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _assert_one_line_error(result, expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def empty_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("no_cifar10"))


# bench_input (absl).

INPUT_CASES = [
    (["--datasets=foo"], "invalid --datasets=foo: unknown foo; use some of embedded,cifar10"),
    (["--datasets="], "invalid --datasets=: it is empty"),
    (["--datasets=cifar10"], "missing CIFAR-10 folder: --datasets includes cifar10"),
    (["--num_devices=-1"], "invalid --num_devices=-1: it must be at least 0"),
    (["--repeats=0"], "invalid --repeats=0: it must be at least 1"),
    (["--cold_repeats=-1"], "invalid --cold_repeats=-1: it must be at least 0"),
    (["--num_batches=0"], "invalid --num_batches=0: it must be at least 1"),
    (["--step_repeats=-1"], "invalid --step_repeats=-1: it must be at least 0"),
    (["--loop_steps=-1"], "invalid --loop_steps=-1: it must be at least 0"),
    (["--loop_repeats=0"], "invalid --loop_repeats=0: it must be at least 1"),
    (["--loop_budget_s=nan"], "invalid --loop_budget_s=nan: it must be at least 0"),
    (["--tiny", "--repeats=0"], "invalid --repeats=0"),
    (["--repeats=abc"], "--repeats=abc"),
    (["--no_such_flag"], "no_such_flag"),
    (["extra"], "unexpected arguments extra"),
    (["--cifar10_dir=/nonexistent"], "invalid --cifar10_dir=/nonexistent: /nonexistent is not "
                                     "a folder"),
]


@pytest.mark.parametrize("args,expected", INPUT_CASES)
def test_bench_input_bad_flag(args, expected):
    _assert_one_line_error(_run_module("experiments.bench_input", *args), expected)


def test_bench_input_cifar10_dir_without_archive(empty_dir):
    result = _run_module("experiments.bench_input", f"--cifar10_dir={empty_dir}")
    _assert_one_line_error(result, "it contains neither train.tar nor the folder train/")


def test_bench_input_cifar10_dir_from_variable(empty_dir):
    result = _run_module("experiments.bench_input",
                         env_update={"ASCL_JAX_CIFAR10_DIR": empty_dir})
    _assert_one_line_error(result, f"invalid --cifar10_dir={empty_dir}")


def test_bench_input_unknown_cifar10_config(empty_dir):
    os.makedirs(os.path.join(empty_dir, "train"), exist_ok=True)
    result = _run_module("experiments.bench_input", f"--cifar10_dir={empty_dir}",
                         "--cifar10_config=no_such_config")
    _assert_one_line_error(result, "invalid --cifar10_config=no_such_config")


def test_bench_input_default_skips_cifar10():
    # --num_batches=0 stops the run at the checks, after the default dropped cifar10.
    result = _run_module("experiments.bench_input", "--num_batches=0")
    _assert_one_line_error(result, "invalid --num_batches=0")
    assert "CIFAR-10" not in result.stderr

    options = bench_input.Options(datasets=("embedded",), cifar10_dir="")
    bench_input.check_options(options)


def test_bench_input_cifar10_folder_layout(tmp_path):
    options = bench_input.Options(datasets=("cifar10",), cifar10_dir=str(tmp_path))
    with pytest.raises(ValueError, match="neither train.tar nor the folder train/"):
        bench_input.check_options(options)
    (tmp_path / "train.tar").write_bytes(b"")
    bench_input.check_options(options)


# bench_loss (argparse), in this process.

LOSS_CASES = [
    (["--n="], "argument --n: '' is empty"),
    (["--n=abc"], "argument --n: 'abc' is not a list of integers"),
    (["--n=0"], "invalid --n 0: each bank size must be a positive integer of at least "
                "--num_neighbors (5)"),
    (["--n=4", "--num_neighbors=5"], "invalid --n 4"),
    (["--batch=0"], "invalid --batch 0: it must be a positive integer"),
    (["--dim=0"], "invalid --dim 0: it must be a positive integer"),
    (["--num_neighbors=0"], "invalid --num_neighbors 0: it must be a positive integer"),
    (["--block_rows=0"], "invalid --block_rows 0: it must be a positive integer"),
    (["--chunk_size=-1"], "invalid --chunk_size -1: it must be a positive integer"),
    (["--repeats=0"], "invalid --repeats 0: it must be a positive integer"),
    (["--kinds="], "argument --kinds: '' is empty"),
    (["--kinds=normal,foo"], "unknown label rule 'foo'"),
    (["--batch=x"], "argument --batch: invalid int value: 'x'"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
]


@pytest.mark.parametrize("args,expected", LOSS_CASES)
def test_bench_loss_bad_flag(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_loss.main(args)
    message = exit_info.value.code
    assert isinstance(message, str)  # sys.exit(message) prints it and exits with status 1.
    assert message.startswith("error: ")
    assert "\n" not in message
    assert expected in message
    assert capsys.readouterr().err == ""  # No usage lines.


def test_bench_loss_bad_flag_status():
    result = _run_module("experiments.bench_loss", "--batch=0")
    _assert_one_line_error(result, "invalid --batch 0")


def test_bench_loss_valid_flags_parse():
    args = bench_loss.parse_args(["--n=8,16", "--kinds=normal,ascl", "--num_neighbors=8"])
    assert args.n == [8, 16]
    assert args.kinds == ["normal", "ascl"]


# bench_train (absl).

TRAIN_CASES = [
    (["--batch_sizes=abc"], "invalid --batch_sizes=abc: pass comma-separated integers"),
    (["--batch_sizes="], "invalid --batch_sizes=: it is empty"),
    (["--batch_sizes=0"], "invalid batch size 0 in --batch_sizes"),
    (["--model=resnet99"], "invalid --model=resnet99"),
    (["--model=resnet50"], "pass one of them, or --notorch"),
    (["--model=resnet99", "--notorch"], "invalid --model=resnet99: use one of resnet10"),
    (["--dtypes="], "invalid --dtypes=: it is empty"),
    (["--dtypes=float16"], "invalid dtype 'float16' in --dtypes"),
    (["--image_size=0"], "invalid --image_size=0: it must be a positive integer"),
    (["--image_size=5", "--batch_sizes=8", "--bn_groups=8"],
     "invalid --image_size=5 for batch size 8 and --bn_groups=8"),
    (["--bn_groups=0"], "invalid --bn_groups=0: it must be a positive integer"),
    (["--queue_size=0"], "invalid --queue_size=0"),
    (["--queue_size=100"], "invalid batch size 64 for --queue_size=100"),
    (["--steps=0"], "invalid --steps=0"),
    (["--repeats=0"], "invalid --repeats=0"),
    (["--hidden_dim=0"], "invalid --hidden_dim=0"),
    (["--projection_dim=0"], "invalid --projection_dim=0"),
    (["--warmup=-1"], "invalid --warmup=-1: it must be 0 or more"),
    (["--torch_threads=-1"], "invalid --torch_threads=-1: it must be 0 or more"),
    (["--steps=x"], "--steps=x"),
    (["--no_such_flag"], "no_such_flag"),
    (["extra"], "unexpected arguments extra"),
]


@pytest.mark.parametrize("args,expected", TRAIN_CASES)
def test_bench_train_bad_flag(args, expected):
    result = _run_module("experiments.bench_train", *args)
    _assert_one_line_error(result, expected)
    assert result.stdout == ""  # No help text and no benchmark output.


def test_bench_train_usage_line():
    # bench_train defines flags of the same names as bench_input, so read its docstring
    # without importing it.
    with open(os.path.join(ROOT, "experiments", "bench_train.py")) as source:
        docstring = ast.get_docstring(ast.parse(source.read()))
    usage_lines = docstring.split("Usage:")[1].strip().splitlines()[:2]
    for line in usage_lines:
        assert "  " not in line.strip(), line
