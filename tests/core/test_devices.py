"""--device: resolution, the CLI option, and merge kernels that keep every tensor on their inputs' device."""

import pytest
import torch
from click.testing import CliRunner
from helpers import load, raw_bytes

import surgery
from surgery.core import devices
from surgery.core.devices import compute_context, current_device, resolve_device
from surgery.errors import SurgeryError


def test_resolve_device(monkeypatch):
    assert resolve_device(None) == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(SurgeryError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(SurgeryError, match="no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda"


def test_compute_context_sets_and_restores_device_and_threads():
    before = torch.get_num_threads()
    with compute_context("cuda", threads=1):
        assert current_device() == "cuda" and torch.get_num_threads() == 1
    assert current_device() == "cpu" and torch.get_num_threads() == before


def test_merge_moves_inputs_to_the_current_device(family, tmp_path, monkeypatch):
    """The merge op hands the kernels tensors on the current device (recorded here on CPU, where it is a no-op)."""
    from surgery.core import devices

    seen = []
    real = devices.current_device

    def spy():
        seen.append(real())
        return real()

    monkeypatch.setattr("surgery.core.devices.current_device", spy)
    monkeypatch.setenv("SURGERY_BACKEND", "torch")  # the torch kernels (on the CPU, linear merges compute in numpy)
    config = {"inputs": {k: str(v) for k, v in family.items()}, "recipient": "base",
              "operations": [{"merge": {"method": "linear", "models": {"lang": {"weight": 0.5},
                                                                       "task": {"weight": 0.5}}}}]}
    surgery.run(config, tmp_path / "cpu")
    surgery.run(config, tmp_path / "auto", device="auto" if not torch.cuda.is_available() else "cpu")
    assert seen and set(seen) == {"cpu"}
    a, b = load(tmp_path / "cpu"), load(tmp_path / "auto")
    assert all(raw_bytes(a[n]) == raw_bytes(b[n]) for n in a)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_kernels_allocate_on_the_inputs_device(method):
    """Run the kernels on the meta device: any tensor they create on the CPU would fail to mix with the inputs."""
    from surgery.merge.gta import gta_parallel
    from surgery.merge.linear import torch_chunked

    ts = [torch.empty(64, 48, dtype=torch.bfloat16, device="meta") for _ in range(3)]
    ids = ["a", "b", "base"]
    params = {"weight": {i: 0.5 for i in ids}, "normalize": True}
    if method != "linear":
        params = {"weight": {"a": 0.6, "b": 0.4}, "normalize": False, "lambda": 1.0, "int8_mask": False,
                  "rescale": False}
    kernel = torch_chunked if method == "linear" else gta_parallel
    out = kernel(ts, {"method": method, "ids": ids, "base_index": None if method == "linear" else 2}, params)
    assert out.device.type == "meta" and out.shape == (64, 48) and out.dtype == torch.bfloat16


def test_cli_device_option(family, tmp_path):
    from surgery.cli import cli as main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs: {{a: {family['lang']}, b: {family['task']}}}\nrecipient: a\n"
                      "operations:\n  - merge: {method: linear, models: {a: {weight: 0.5}, b: {weight: 0.5}}}\n")
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(recipe), "-o", str(tmp_path / "o"), "-q", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["run", str(recipe), "-o", str(tmp_path / "o2"), "-q", "--device", "tpu"])
    assert res.exit_code == 2 and "tpu" in res.output
    if not torch.cuda.is_available():
        res = runner.invoke(main, ["run", str(recipe), "-o", str(tmp_path / "o3"), "-q", "--device", "cuda"])
        assert res.exit_code == 1 and "no CUDA GPU" in res.output and not (tmp_path / "o3").exists()
    assert "--device" in runner.invoke(main, ["run", "--help"]).output
    assert devices.DEVICES == ("cpu", "cuda", "auto")


def test_executor_threads_policy(monkeypatch):
    monkeypatch.delenv("SURGERY_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert devices.executor_threads() == 1  # streamed math: one thread unless asked (docs/performance.md)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert devices.executor_threads() is None  # torch's own setting, which follows OMP_NUM_THREADS
    monkeypatch.setenv("SURGERY_THREADS", "3")
    assert devices.executor_threads() == 3
    devices.request_threads(2)  # `surgery run --threads 2`
    try:
        assert devices.executor_threads() == 2
        before = torch.get_num_threads()
        with compute_context("cpu"):
            assert torch.get_num_threads() == 2 and devices.threads_used == 2
        assert torch.get_num_threads() == before
    finally:
        devices.request_threads(None)
