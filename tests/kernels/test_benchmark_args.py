"""The kernel benchmarks refuse bad arguments at parse time, with the parser's usage error (exit code 2) and a message
naming the argument, before any work: nothing is timed, built or printed. Fast: no benchmark runs here (a stand-in
for the first piece of work raises if a bad argument gets that far)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


class WorkStarted(Exception):
    """Raised by the stand-in for a benchmark's first piece of work."""


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_lpl_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _work_started(*args, **kwargs):
    raise WorkStarted


def _refused(main, argv, capsys, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured
    assert message in captured.err, captured.err
    assert "Traceback" not in captured.err and captured.out == ""  # no table header, nothing measured


@pytest.fixture
def cpu_block_sparse(monkeypatch):
    module = _load("cpu_block_sparse")
    monkeypatch.setattr(module.torch, "set_num_threads", _work_started)  # its first step after parsing
    monkeypatch.setattr(module, "random_block_weight", _work_started)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["--blocks", "abc"], "argument --blocks: 'abc' is not a whole number"),
    (["--blocks", "0"], "argument --blocks: must be at least 1, got 0"),
    (["--blocks", "64,,16"], "argument --blocks: '64,,16': give a comma-separated list"),
    (["--tokens", "-5"], "argument --tokens: must be at least 1, got -5"),
    (["--tokens", "0"], "argument --tokens: must be at least 1, got 0"),  # was: silently the default
    (["--reps", "-1"], "argument --reps: must be at least 1, got -1"),
    (["--reps", "0"], "argument --reps: must be at least 1, got 0"),
    (["--bsr-reps", "0"], "argument --bsr-reps: must be at least 1, got 0"),
    (["--densities", "2.0"], "argument --densities: must be in (0, 1], got 2.0"),
    (["--densities", "-1"], "argument --densities: must be in (0, 1], got -1.0"),
    (["--densities", "0.5,x"], "argument --densities: 'x' in '0.5,x': 'x' is not a number"),
    (["--densities", "0.0001", "--blocks", "64"], "--densities 0.0001 keeps no block of the fc1 layer"),
])
def test_cpu_block_sparse_refuses_bad_arguments(cpu_block_sparse, argv, message, capsys, tmp_path):
    _refused(cpu_block_sparse.main, argv + ["--out", str(tmp_path / "table.md")], capsys, message)


def test_cpu_block_sparse_defaults_are_explicit(cpu_block_sparse):
    args = cpu_block_sparse.parse_args([])
    assert (args.tokens, args.reps, args.bsr_reps, args.blocks, args.densities) == (
        64 * 197, 9, 2, [64, 32, 16], [0.5, 0.25, 1.0])
    args = cpu_block_sparse.parse_args(["--quick", "--tokens", "7", "--blocks", "16", "--densities", "1"])
    assert (args.tokens, args.reps, args.bsr_reps, args.blocks, args.densities) == (7, 5, 1, [16], [1.0])


_NO_GPU = [(["--device", "cuda"], "--device cuda: no CUDA GPU is visible on this machine")] \
    if not torch.cuda.is_available() else []


@pytest.mark.parametrize("argv, message", [
    (["--device", "nope"], "--device 'nope' is not a device; use cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device 'meta': this runs on cpu or cuda"),
    (["--budget-s", "-1"], "argument --budget-s: must be a number above 0, got -1"),
    (["--budget-s", "0"], "argument --budget-s: must be a number above 0, got 0"),
    *_NO_GPU,
])
def test_kernels_benchmark_refuses_bad_arguments(argv, message, capsys, tmp_path, monkeypatch):
    module = _load("kernels")
    monkeypatch.setattr(module, "run", _work_started)
    monkeypatch.setattr(module, "environment_lines", _work_started)
    _refused(module.main, argv + ["--out", str(tmp_path)], capsys, message)


@pytest.mark.parametrize("argv, message", [
    (["--device", "nope"], "--device 'nope' is not a device; use cpu, cuda or cuda:N"),
    (["--batch", "-1"], "argument --batch: must be at least 1, got -1"),
    (["--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["--block", "0"], "argument --block: must be at least 1, got 0"),
    (["--flops-keep", "2"], "argument --flops-keep: must be in (0, 1], got 2.0"),
    (["--importance", "nope"], "argument --importance: invalid choice: 'nope'"),
    (["--calib-batches", "0"], "argument --calib-batches: must be at least 1, got 0"),
    (["--calib-batch-size", "0"], "argument --calib-batch-size: must be at least 1, got 0"),
    (["--budget-s", "-2"], "argument --budget-s: must be a number above 0, got -2"),
    (["--energy-s", "0"], "argument --energy-s: must be a number above 0, got 0"),
    *_NO_GPU,
])
def test_vit_e2e_refuses_bad_arguments(argv, message, capsys, tmp_path, monkeypatch):
    module = _load("vit_e2e")
    monkeypatch.setattr(module, "build_model", _work_started)
    monkeypatch.setattr(module, "prune", _work_started)
    monkeypatch.setattr(module.bench, "environment_lines", _work_started)  # comes before the table header
    _refused(module.main, argv + ["--models", "deit_s", "--out", str(tmp_path)], capsys, message)
