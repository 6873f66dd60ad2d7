"""Command line: parse arguments and call the library; no logic lives here.

Each subcommand has its own `_add_<name>` block (its flags) and dispatches to one library function (or,
for a command with checks of its own flags, to its handler in `evomerge.commands`), imported lazily so
that `evomerge --help` never imports torch, transformers, lm_eval or ray.
`EvomergeError` (bad user input) becomes one line on stderr and exit code 2; a `ConfigWarning` (a key
that has no effect) one `evomerge: warning:` line; any other exception is a bug: its traceback is saved
to a file, one line says where, and the exit code is 70.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from evomerge import __version__
from evomerge.errors import ConfigWarning, EvomergeError


# --- merge / validate (merge engine) -------------------------------------------------------------
TRUST_HELP = ("accept source models with their own Python code (config.json auto_map): search loads them "
              "with it, merge copies the code next to the merged config")


ROOT_HELP = ("folder that holds the recipe's model folders: each model path is looked up there by its folder "
             "name (a best.yaml moved to another machine)")


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge models as a mergekit YAML recipe says, into OUT",
                       description="Merge models as a mergekit YAML recipe says (every method of mergekit 0.1.5, "
                       "the same tensors) into OUT: sharded safetensors, config, tokenizer and a model card, written "
                       "to a temporary folder and renamed into place. A search's best.yaml gives the model that "
                       "was scored.")
    p.add_argument("config", help="mergekit-style YAML recipe")
    p.add_argument("out", help="output folder (Hugging Face layout)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--out-shard-size", default="5GB", help="largest shard, e.g. 500MB, 5GB (default 5GB)")
    p.add_argument("--device", default="cpu", help="where tensors are merged (cpu, cuda, cuda:1, auto)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the arithmetic (default 2, or $EVOMERGE_MERGE_THREADS); use the "
                        "search's value to reproduce its candidates bit for bit")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--model-root", help=ROOT_HELP)
    p.set_defaults(func=_run_merge)

    v = sub.add_parser("validate", help="check a recipe, an MoE config or a search space without building or "
                                        "searching",
                       description="Check a merge recipe, a mergekit-moe config or a search space without merging "
                       "or searching: every key, model, shape and method parameter; for a space also its tasks, "
                       "metrics, split sizes and protocol (a one-item dry run). Writes nothing; exit 2 names what "
                       "is wrong.")
    v.add_argument("config", help="mergekit-style YAML recipe, a mergekit-moe config, or a search space (prints "
                                  "its objective)")
    v.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    v.add_argument("--model-root", help=ROOT_HELP + " (recipes only)")
    v.add_argument("--allow-overlap", action="store_true", help="spaces: report overlapping items instead of refusing")
    v.add_argument("--device", default="cpu", help="the memory plan for this device (cpu, cuda, cuda:N, auto): a "
                                                   "recipe's merge, a space's search workers (VRAM per worker)")
    v.add_argument("--workers", type=int, default=None, help="spaces: the memory plan for `search --workers N`")
    v.add_argument("--allow-public-benchmark-contamination", action="store_true",
                   help="spaces: accept an objective over a public benchmark's test set")
    v.set_defaults(func=_run_validate)


# --- moe (mixtures of experts) -------------------------------------------------------------------
def _add_moe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("moe", help="build a mixture of experts from dense fine-tunes (mergekit-moe's YAML) into OUT",
                       description="Build a Mixtral (or, with one shared expert, a Qwen2-MoE) from dense fine-tunes "
                       "of one base: the base gives attention, norms and embeddings, each expert its MLP, and the "
                       "routers come from the experts' prompts. The config is mergekit-moe's.")
    p.add_argument("config", help="mergekit-moe YAML config")
    p.add_argument("out", help="output folder (Hugging Face layout)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--out-shard-size", default="5GB", help="largest shard, e.g. 500MB, 5GB (default 5GB)")
    p.add_argument("--device", default="cpu", help="where the base runs for hidden-state routers (cpu, cuda)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress display")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--model-root", help=ROOT_HELP)
    p.add_argument("--allow-all-same", action="store_true",
                   help="allow every expert to be the same model (useful only if you will train the result)")
    p.set_defaults(func=_run_moe)


def _run_moe(args: argparse.Namespace) -> int:
    from evomerge.moe.build import moe_to_dir

    t0 = time.perf_counter()
    out = moe_to_dir(args.config, args.out, overwrite=args.overwrite, shard_size=args.out_shard_size,
                     device=args.device, progress=not args.no_progress, trust_remote_code=args.trust_remote_code,
                     allow_all_same=args.allow_all_same, model_root=args.model_root)
    _wrote(out, t0)
    return 0


def _wrote(out, t0: float) -> None:
    """The folder a build wrote, always (also with --no-progress): a script should not have to guess."""
    print(f"evomerge: wrote {out} in {time.perf_counter() - t0:.1f} s")



def _run_merge(args: argparse.Namespace) -> int:
    from evomerge.engine.merge import merge_to_dir
    from evomerge.moe.config import is_moe_file

    if is_moe_file(args.config):
        from evomerge.errors import ConfigError

        raise ConfigError("this is an MoE config (it lists experts), not a merge recipe", where=args.config,
                          fix=f"build it with: evomerge moe {args.config} {args.out}")

    t0 = time.perf_counter()
    out = merge_to_dir(
        args.config,
        args.out,
        overwrite=args.overwrite,
        shard_size=args.out_shard_size,
        device=args.device,
        progress=not args.no_progress,
        threads=args.threads,
        trust_remote_code=args.trust_remote_code,
        model_root=args.model_root,
    )
    _wrote(out, t0)
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    from evomerge.search.spacefile import is_space_file

    if is_space_file(args.config):
        from evomerge.search.preflight import validate_space

        if args.model_root:
            from evomerge.errors import ConfigError

            raise ConfigError("--model-root applies to merge recipes, and this is a search space", where="--model-root",
                              fix="drop --model-root; a space's model paths are resolved from the space file's folder")
        print(validate_space(args.config, trust_remote_code=args.trust_remote_code, allow_overlap=args.allow_overlap,
                             allow_public_benchmark=args.allow_public_benchmark_contamination,
                             workers=args.workers or 1, device=args.device))
        return 0
    from evomerge.moe.config import is_moe_file

    if is_moe_file(args.config):
        from evomerge.moe.build import validate_moe

        print(validate_moe(args.config, trust_remote_code=args.trust_remote_code, model_root=args.model_root))
        return 0
    from evomerge.engine.merge import validate_config

    if args.workers is not None:
        from evomerge.errors import ConfigError

        raise ConfigError("--workers applies to search spaces, and this is a merge recipe", where="--workers",
                          fix="drop --workers; a merge runs in one process")
    print(validate_config(args.config, trust_remote_code=args.trust_remote_code, model_root=args.model_root,
                          device=args.device))
    return 0


# --- init (a starter search space) ----------------------------------------------------------------
def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a commented starter search space for these models",
                       description="Write a search space for MODELs: two models get a slerp gradient between them; "
                       "a base and experts (the first model, or --base) get task arithmetic, with TIES and DARE "
                       "as commented alternatives; the objective is TASKs, carved into search/select/report. "
                       "Models are folders or Hub ids (org/name, org/name@revision). Nothing is loaded: check "
                       "the file with `evomerge validate`.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folders or Hub ids (the first is the base "
                                                                 "when there are more than two)")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                   help="lm-eval tasks to optimise (TASK or TASK:METRIC; metric default exact_match)")
    p.add_argument("--tasks-dir", help="folder of your lm-eval task YAML")
    p.add_argument("--base", help="the base model (default: the first MODEL when there are more than two)")
    p.add_argument("--out", default="space.yaml", help="the space file to write (default: space.yaml)")
    p.add_argument("--name", help="the run's name (default: from --out)")
    p.add_argument("--trials", type=int, help="trial budget (default 30 for two models, 60 otherwise)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_run_init)


def _run_init(args: argparse.Namespace) -> int:
    from evomerge.commands.init import run

    return run(args)


# --- toy (embedded model family) -----------------------------------------------------------------
def _add_toy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("toy", help="locate or rebuild the embedded toy model family")
    p.set_defaults(func=_run_toy_path)
    tsub = p.add_subparsers(dest="toy_command")
    path = tsub.add_parser("path", help="print where the embedded family lives")
    path.set_defaults(func=_run_toy_path)
    build = tsub.add_parser("build", help="rebuild the family from scratch (deterministic)")
    build.add_argument("out", help="output folder")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quick", action="store_true", help="reduced build for tests (seconds)")
    build.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    build.set_defaults(func=_run_toy_build)


def _run_toy_path(args: argparse.Namespace) -> int:
    from evomerge.toy.family import family

    print(family().root)
    return 0


def _run_toy_build(args: argparse.Namespace) -> int:
    from evomerge.toy.family import build

    fam = build(args.out, seed=args.seed, quick=args.quick, overwrite=args.overwrite)
    print(fam.root)
    return 0


# --- search --------------------------------------------------------------------------------------
def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="search merge recipes with Optuna, scored in memory by lm-eval",
        description="Search merge recipes with Optuna. Running the same command again resumes the "
        "study in OUT and completes the budget with the settings it was made with; flags override the space "
        "file's `search:` section, and on resume the study's.",
    )
    p.add_argument("space", help="search space YAML (see search_spaces/)")
    p.add_argument("--trials", type=int, help="budget: finished trials in the study (default: the space's)")
    p.add_argument("--out", help="run folder (default: runs/<space name>)")
    p.add_argument("--sampler", choices=["auto", "cmaes", "tpe", "gp", "nsga2", "random", "grid"],
                   help="Optuna sampler (auto: CMA-ES for float spaces, TPE otherwise, NSGA-II multi-objective; "
                        "gp: Gaussian-process Bayesian optimisation)")
    p.add_argument("--pruner", choices=["none", "median", "hyperband", "successive_halving"],
                   help="Optuna pruner; needs search.fitness: fidelity (item-count rungs) in the space")
    p.add_argument("--seed", type=int, help="sampler and subset seed")
    p.add_argument("--limit", type=int, help="items of the search split per trial (seeded subset)")
    p.add_argument("--top-k", type=int, help="candidates re-scored on the select split")
    p.add_argument("--batch", type=int,
                   help="reproducible parallel runs: rounds of N trials, told in trial order, so the same seed "
                        "gives the same trials whatever --workers and the timing (default: asynchronous)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/study.db)")
    p.add_argument("--workers", type=int, default=1, help="parallel workers (more than 1 uses Ray)")
    p.add_argument("--ray-address", help="join this Ray cluster instead of running in-process")
    p.add_argument("--trial-timeout", type=float, help="seconds a trial may take before it counts as failed")
    p.add_argument("--threads-per-worker", type=int, help="torch threads per worker")
    p.add_argument("--device", default="cpu",
                   help="where trials merge and score: cpu (default), cuda, cuda:N or auto; with Ray, cuda gives "
                        "each worker one GPU")
    p.add_argument("--evaluator", help=argparse.SUPPRESS)  # module:callable, for tests and plug-ins
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--verbose", action="store_true",
                   help="also show transformers', datasets' and lm-eval's own progress bars and warnings")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--allow-overlap", action="store_true",
                   help="search although the overlap audit found items in two splits or two tasks (the report says so)")
    p.add_argument("--allow-public-benchmark-contamination", action="store_true",
                   help="search on a public benchmark's test set (mmlu, gsm8k, arc, ...); the report marks the run")
    p.add_argument("--no-evidence", action="store_true", help=argparse.SUPPRESS)  # benchmarks/evidence_overhead.py
    p.add_argument("--reopen-report", action="store_true",
                   help="allow more trials after the report split was evaluated (the report says so)")
    p.set_defaults(func=_run_search)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score models (merges and their parents) under one protocol, with intervals "
                                    "and paired tests",
                       description="Score every MODEL on the same items under one protocol: a search space's "
                       "objective (its report split by default) or plain lm-eval tasks. Prints a models x tasks "
                       "table with 95% intervals and paired tests against the first model; --out writes eval.md, "
                       "eval.json and eval.png.")
    p.add_argument("models", nargs="+", help="model folders (Hugging Face layout); the first is the reference")
    p.add_argument("--space", help="score this search space's objective (tasks, weights, splits, protocol)")
    p.add_argument("--tasks", nargs="+", help="lm-eval tasks (or task:metric), scored whole")
    p.add_argument("--tasks-dir", help="folder of lm-eval task YAML for --tasks")
    p.add_argument("--metric", default="exact_match", help="metric for --tasks without :metric (default exact_match)")
    p.add_argument("--split", default="report", help="split role with --space: search, select or report (default)")
    p.add_argument("--limit", type=int, help="seeded subset of N items per task")
    p.add_argument("--out", help="folder for eval.md, eval.json, eval.png")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from evomerge.search.comparison import eval_models

    eval_models(args.models, space=args.space, tasks=args.tasks, tasks_dir=args.tasks_dir, metric=args.metric,
                split=args.split, limit=args.limit, out=args.out, device=args.device, dtype=args.dtype,
                trust_remote_code=args.trust_remote_code, progress=not args.no_progress)
    return 0


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="print a finished run's evidence again; exit 1 if it broke its protocol",
                       description="Print a finished run's splits and item hashes, overlap audit, benchmark lint, "
                       "parent audit, statistics and protocol, from what the run stored. Exit 1 when the run "
                       "broke its own protocol (the report split evaluated twice, trials after the report).")
    p.add_argument("run", help="the run folder (--out of evomerge search)")
    p.set_defaults(func=_run_audit)


def _run_audit(args: argparse.Namespace) -> int:
    from evomerge.search.audit import audit_run

    text, breaches = audit_run(args.run)
    print(text, end="")
    return 1 if breaches else 0


def _run_search(args: argparse.Namespace) -> int:
    from evomerge.commands.search import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge",
        description="Search model-merge recipes and export them as mergekit-compatible YAML.",
    )
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_search(sub)
    _add_merge(sub)
    _add_moe(sub)
    _add_eval(sub)
    _add_audit(sub)
    _add_init(sub)
    _add_toy(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """A ConfigWarning as one line on stderr; any other warning as Python shows it."""
    if issubclass(category, ConfigWarning):
        print(f"evomerge: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(args.func(args) or 0)
        except EvomergeError as exc:
            print(f"evomerge: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("evomerge: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - the last guard: a bug, never a raw traceback
            return _internal_error(exc, argv)


INTERNAL_ERROR = 70  # sysexits' EX_SOFTWARE: not the user's mistake (2) nor a broken run's protocol (audit's 1)


def _internal_error(exc: Exception, argv: list[str] | None) -> int:
    """Save the traceback to a file and say, in one line, that this is ours to fix."""
    import datetime
    import tempfile
    import traceback

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = f"{tempfile.gettempdir()}/evomerge-crash-{stamp}-{os.getpid()}.txt"
    text = f"evomerge {__version__}\nargv: {sys.argv[:1] + list(argv if argv is not None else sys.argv[1:])}\n\n" + \
        "".join(traceback.format_exception(exc))
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        where = f"the traceback is in {path}"
    except OSError:
        where = "the traceback could not be saved"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    print(f"evomerge: internal error ({type(exc).__name__}: {first}); this is a bug in evomerge, please report "
          f"it: {where}", file=sys.stderr)
    return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
