"""The device path without a GPU: `--device` is checked before any work, the spec carries it to the
workers, Ray actors get one GPU each when the device is cuda, and the install keeps a GPU user's torch.

The GPU run itself (merge parity CPU vs GPU, per-trial times on a GPU) needs a GPU machine; these tests
check the plumbing that decides where tensors go.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SPACE = """
name: dev
models: [toy:up, toy:rev]
method: slerp
objective: {tasks_dir: toy, tasks: [toy_up, toy_rev]}
search: {trials: 2, limit: 8, top_k: 1}
"""


def _space(tmp_path: Path) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(textwrap.dedent(SPACE))
    return p


def test_resolve_device():
    import torch

    from evomerge.engine.execution import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="--device: unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("args, match", [
    (["--device", "cuda:3", "--workers", "2"], r"--device: --device cuda:3 with Ray: each actor takes one GPU"),
    (["--device", "tpu"], r"--device: unknown device 'tpu'"),
])
def test_search_refuses_a_bad_device_before_any_work(tmp_path, capsys, args, match):
    out = tmp_path / "run"
    assert main(["search", str(_space(tmp_path)), "--out", str(out), "--no-progress", *args]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not out.exists()


def test_search_on_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal cannot happen here")  # the GPU check script covers it
    out = tmp_path / "run"
    assert main(["search", str(_space(tmp_path)), "--out", str(out), "--no-progress", "--device", "cuda"]) == 2
    assert "CUDA is not available on this machine" in capsys.readouterr().err and not out.exists()


def test_the_worker_spec_carries_the_device(tmp_path):
    from evomerge.search.jobs import worker_spec
    from evomerge.search.spacefile import load_space

    space = load_space(_space(tmp_path))
    assert worker_spec(space).device == "cpu"
    assert worker_spec(space, device="cuda:1").device == "cuda:1"


def test_ray_actors_take_one_gpu_each_for_cuda(tmp_path):
    from evomerge.executors.ray_pool import actor_options
    from evomerge.executors.worker import WorkerSpec

    spec = WorkerSpec(sources=("a",), base="a", device="cuda")
    got, opts = actor_options(spec, {"CPU": 16, "GPU": 2}, environ={})
    assert got.device == "cuda" and opts["num_gpus"] == 1
    with pytest.raises(ConfigError, match="the Ray cluster has no GPU"):
        actor_options(spec, {"CPU": 16}, environ={})
    auto = WorkerSpec(sources=("a",), base="a", device="auto")
    assert actor_options(auto, {"CPU": 4}, environ={})[0].device == "cpu"
    got, opts = actor_options(auto, {"CPU": 4, "GPU": 1}, environ={})
    assert got.device == "cuda" and opts["num_gpus"] == 1


def test_the_package_depends_on_a_torch_range_and_setup_pins_the_cpu_build():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = next(d for d in deps if re.match(r"torch\b", d))
    assert "==" not in torch_dep and ">=" in torch_dep and "<" in torch_dep, torch_dep
    assert 'pip install -q "torch==2.13.0"' in (ROOT / "scripts" / "setup.sh").read_text()
