"""The run folder's plots: the search history, the winner's per-layer curves, parameter importances,
the Pareto front of a multi-objective run, and the score chart that `eval` and report.md share.

Why it exists: results people would rather see than read get a plot; report.md links them. Each plot is
written atomically next to the run's other files (matplotlib is imported inside the functions that draw).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

from evomerge.engine.output import atomic_write


def _num_layers(path: str) -> int:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)


def winner_curves(recipe, num_layers: int) -> dict[str, list[float]]:
    """Per-layer values of every searched number in the winner: {"t (self_attn)": [...], ...}.

    Evaluated with the recipe module's own gradient/filter rules, at sample tensor names per filter."""
    from evomerge.engine.parameters import evaluate_setting, layer_t
    from evomerge.engine.recipe import ConditionalParameter, MergeRecipe

    if not isinstance(recipe, MergeRecipe):  # an MoE config has no per-layer numbers
        return {}

    def groups(setting) -> list[str | None]:
        items = setting if isinstance(setting, list) else [setting]
        gs = [c.filter for c in items if isinstance(c, ConditionalParameter)]
        return gs or [None]

    settings = []
    for name, setting in (recipe.parameters or {}).items():
        settings.append((name, setting))
    for m in recipe.models or []:
        for name, setting in (m.parameters or {}).items():
            settings.append((f"{name} [{Path(m.model).name}]", setting))
    curves = {}
    n = max(num_layers, 1)
    for name, setting in settings:
        for g in groups(setting):
            tensor = f"model.layers.{{i}}.{g}.weight" if g else "model.layers.{i}.other.weight"
            values = []
            for i in range(n):
                v = evaluate_setting(setting, tensor.format(i=i), layer_t(i, n))
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    values = []
                    break
                values.append(float(v))
            if values:
                curves[f"{name} ({g or 'rest'})" if len(groups(setting)) > 1 or g else name] = values
    return curves


def write_plots(result, out: Path, ev: dict | None = None) -> list[str]:
    """PNG plots into out/plots; returns their paths relative to `out`. Skips what cannot be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    plots = _Plots(out / "plots")
    _study_plots(result, plots)
    if result.winner is not None:
        _winner_plot(result, plots)
    if ev and ev.get("models"):
        fig = score_chart(ev, f"{result.space.name}: report split, 95% intervals")
        plots.save(fig, "report_scores.png")
    return plots.made


class _Plots:
    """The run's plots folder and the PNGs saved into it (`made`: paths relative to the run folder)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(exist_ok=True)
        self.made: list[str] = []

    def save(self, obj, name: str) -> None:
        import matplotlib.pyplot as plt
        from matplotlib.figure import Figure

        if hasattr(obj, "flat"):  # an array of axes
            obj = obj.flat[0]
        fig = obj if isinstance(obj, Figure) else obj.figure
        buf = io.BytesIO()
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")  # titles and labels inside the image
        plt.close(fig)
        atomic_write(self.folder / name, buf.getvalue())
        self.made.append(f"plots/{name}")


def _study_plots(result, plots: _Plots) -> None:
    """Optuna's plots of the study: the history (one per task when multi-objective), parameter
    importances, the Pareto front. A plot never fails a run."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    study = result.study
    multi = result.space.objective.multi_objective
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if complete:
            try:
                if multi:
                    for i, task in enumerate(result.space.objective.tasks):
                        plots.save(ovm.plot_optimization_history(study, target=lambda t, i=i: t.values[i],
                                                                 target_name=task.task), f"history_{task.task}.png")
                else:
                    ax = ovm.plot_optimization_history(study, target_name="search score")
                    _mark_winner(ax, result)
                    plots.save(ax, "history.png")
            except Exception:  # noqa: BLE001 - a plot never fails a run
                pass
        if len(complete) >= 3 and any(t.params for t in complete):
            try:
                target = (lambda t: t.values[0]) if multi else None
                name = result.space.objective.tasks[0].task if multi else "search score"
                plots.save(ovm.plot_param_importances(study, target=target, target_name=name), "importances.png")
            except Exception:  # noqa: BLE001
                pass
        if multi and len(complete) >= 2:
            try:
                plots.save(ovm.plot_pareto_front(study, target_names=[t.task for t in result.space.objective.tasks]),
                           "pareto.png")
            except Exception:  # noqa: BLE001
                pass


def _mark_winner(ax, result) -> None:
    """The chosen winner (best on the select split, not necessarily on search) as a star on the history."""
    w = result.winner
    if w is None or w.trial is None or w.scores.get("search", {}).get("score") is None:
        return
    ax.scatter([w.trial], [w.scores["search"]["score"]], marker="*", s=220, color="tab:green", zorder=5,
               edgecolors="black", label=f"chosen winner (trial {w.trial}, best on select)")
    ax.legend(fontsize=8)


def _t_ends(recipe) -> tuple[str, str] | None:
    """For slerp-like recipes, the models at t = 0 and t = 1 (folder names)."""
    from evomerge.engine.recipe import MergeRecipe

    if not isinstance(recipe, MergeRecipe) or recipe.merge_method not in ("slerp", "nuslerp") or not recipe.models:
        return None
    names = [Path(m.model).name for m in recipe.models]
    base = Path(recipe.base_model).name if recipe.base_model else names[0]
    other = next((n for n in names if n != base), None)
    return (base, other) if other else None


def _winner_plot(result, plots: _Plots) -> None:
    """The winner's searched numbers per layer (gradients, filters), when it has any."""
    import matplotlib.pyplot as plt

    space = result.space
    layers = _num_layers(space.base.path if space.base else space.models[0].path)
    curves = winner_curves(result.winner.recipe, layers)
    if curves and layers > 0:
        fig, ax = plt.subplots()
        for name, values in curves.items():
            ax.plot(range(len(values)), values, marker="o", label=name)
        ax.set_xticks(range(layers))
        ax.set_xlabel("layer")
        ends = _t_ends(result.winner.recipe)
        if ends:  # say which parent each end of t is
            ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
            ax.set_yticklabels([f"0 = {ends[0]}", "0.25", "0.5", "0.75", f"1 = {ends[1]}"])
            ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("t" if ends else "value")
        ax.set_title(f"winner ({result.winner.label}): per-layer parameters")
        ax.legend(fontsize=7)
        plots.save(fig, "winner_curves.png")


def score_chart(ev: dict, title: str):
    """Bar chart of each model's report score with its 95% interval as error bars (winner first)."""
    import matplotlib.pyplot as plt

    labels = list(ev["models"])
    points = [ev["models"][k]["report"]["point"] for k in labels]
    err = [[p - ev["models"][k]["report"]["low"] for k, p in zip(labels, points)],
           [ev["models"][k]["report"]["high"] - p for k, p in zip(labels, points)]]
    fig, ax = plt.subplots()
    colors = ["tab:green" if k == ev.get("winner") else ("tab:gray" if k.startswith("parent:") else "tab:blue")
              for k in labels]
    ax.barh(range(len(labels)), points, xerr=err, color=colors, capsize=3)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("report score (weighted objective)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


