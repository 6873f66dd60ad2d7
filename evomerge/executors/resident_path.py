"""The scored model of a layer path: a frankenmerge evaluated in memory over shared, resident layers.

Why it exists: a layer-path search (`method: layer_path`) scores many frankenmerges. Merging each into
a fresh model would copy every layer; instead each source model is loaded once, and a candidate's
model is a thin shell whose layer list refers to those resident layers. Per position on the path it
holds a *twin* of the source layer: a shallow copy of the module objects that shares every weight
tensor, so a layer that runs twice costs no memory. What differs per position:
- the KV cache slot: transformers indexes the cache by each attention module's `layer_idx`, so a
  layer that runs twice would read and overwrite one slot (generation silently wrong). Every twin's
  modules that carry a `layer_idx` get the position on the path;
- a scaled step (a gain): only the tensors the recipe scales (its `scale` filters: o_proj and
  down_proj) are materialised, computed by the engine's own passthrough code from the same plan
  `evomerge merge` executes, so they are the exported tensors bit for bit;
- the config: the shell takes the exported config (`plan.out_config`: the new layer count and the
  per-layer lists, engine/layer_config.py), so masks and caches are built for the path's depth.
The embeddings, final norm and lm_head are the first slice's model's own (mergekit takes them from
the first and last slices, which a layer path takes from the anchor). So the scored logits are the
exported model's: the same tensors through the same modules.

`ResidentPath(sources, dtype=..., device=...).build(recipe) -> model` (the worker calls it for a
passthrough `slices:` recipe; see `executors/worker.py`). The source models stay resident; one shell
per first-slice model is reused, so lm-eval's wrapper is built once.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from evomerge.engine.checkpoints import Sources
    from evomerge.engine.plan import MergePlan
    from evomerge.engine.recipe import MergeRecipe


def twin(module: Any) -> Any:
    """A shallow copy of an `nn.Module` that shares its parameters and buffers (the tensors) but owns its
    child, parameter, buffer and hook tables, so replacing a child or a tensor of the twin leaves the
    original as it was."""
    out = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, (dict, set)):
            out.__dict__[key] = value.copy()
    return out


class _Collected:
    """A sink that keeps the tensors it is given (the scaled projections of one candidate)."""

    def __init__(self):
        self.tensors: dict[str, "torch.Tensor"] = {}

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        self.tensors[name] = tensor

    def finish(self) -> None:
        pass


class ResidentPath:
    """Source models loaded once; `build(recipe)` returns the candidate's model over their layers."""

    def __init__(self, sources: "Sources", *, dtype: str = "float32", device: str = "cpu",
                 trust_remote_code: bool = False):
        self.sources, self.dtype, self.device = sources, dtype, device
        self.trust_remote_code = trust_remote_code
        self.models: dict[str, Any] = {}  # model path -> the loaded source model
        self.shells: dict[str, tuple[Any, Any]] = {}  # first-slice model -> (top module, inner module)

    def model(self, name: str):
        """A source model, loaded once in the resident dtype, on the device, for inference only."""
        if name not in self.models:
            import torch
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(str(self.sources.path(name)), dtype=getattr(torch, self.dtype),
                                                     trust_remote_code=self.trust_remote_code)
            m.to(self.device)
            m.eval()
            m.requires_grad_(False)
            self.models[name] = m
        return self.models[name]

    def build(self, recipe: "MergeRecipe"):
        """The candidate's model: the recipe planned as `evomerge merge` plans it, its steps as twins of the
        resident layers (each with its own cache slot), its scaled tensors materialised."""
        from evomerge.engine.plan import plan

        before = set(self.sources.cache)
        p = plan(recipe, self.sources)
        for key in set(self.sources.cache) - before:  # each path is planned about once: do not keep its
            if isinstance(key, tuple) and key[0] == "plan-structure":  # structure (~100 kB for 30 layers)
                del self.sources.cache[key]
        host_name = p.slices[0].sources[0].model
        if p.slices[-1].sources[0].model != host_name:
            raise ConfigError("the in-memory path needs its first and last slices from one model (they give the "
                              "embeddings and the head)", where="slices", fix="begin and end with the anchor")
        self._check_dtypes(p)
        prefix, owned = _layer_prefix(p), set()
        layers = [self._step(model, layer, position, prefix, owned) for position, (model, layer) in enumerate(_steps(p))]
        for name, tensor in self._scaled(p).items():
            _place(layers, name, tensor, prefix, owned)
        return self._shell(host_name, prefix, layers, p.out_config)

    def _check_dtypes(self, p: "MergePlan") -> None:
        wrong = next((t for t in p.tasks if t.spec.dtype != self.dtype), None)
        if wrong is not None:
            raise ConfigError(f"the path's tensors come out as {wrong.spec.dtype}, the resident models are {self.dtype}",
                              where="dtype", fix="score in the dtype the recipe exports (out_dtype)")

    def _step(self, model: str, layer: int, position: int, prefix: str, owned: set[int]):
        """A twin of `layer` of `model` whose modules with a `layer_idx` (attention) use `position`."""
        source = self.model(model).get_submodule(prefix)[layer]
        step = twin(source)
        owned.add(id(step))
        for path, sub in list(source.named_modules()):
            if hasattr(sub, "layer_idx"):
                _owned(step, path, owned).layer_idx = position
        return step

    def _scaled(self, p: "MergePlan") -> dict[str, "torch.Tensor"]:
        """Every output tensor the recipe multiplies (a `scale` that applies to it), computed by the engine."""
        from evomerge.engine.execution import execute

        tasks = [t for t in p.tasks if any(mp.get("scale") is not None for mp in t.model_params.values())]
        if not tasks:
            return {}
        sink = _Collected()
        execute(dataclasses.replace(p, tasks=tasks), sink, self.sources, device=self.device, workers=1)
        return sink.tensors

    def _shell(self, host_name: str, prefix: str, layers: list, out_config: dict):
        """The host model's shell (made once per host, reused): its own config and layer list."""
        from torch import nn

        host = self.model(host_name)
        if host_name not in self.shells:
            top = twin(host)
            self.shells[host_name] = (top, _owned(top, prefix.rpartition(".")[0], set()))
        top, inner = self.shells[host_name]
        config = type(host.config).from_dict(out_config)
        config._attn_implementation = host.config._attn_implementation
        inner._modules[prefix.rpartition(".")[2]] = nn.ModuleList(layers)
        inner.config = config
        top.config = config
        return top


def _owned(root: Any, path: str, owned: set[int]) -> Any:
    """The module at `path` under `root` (a twin), twinned on the way down so that it may be changed
    without changing the shared original; `owned` holds the ids of the twins made so far (and grows).
    `root` itself for an empty path."""
    module = root
    for part in [p for p in path.split(".") if p]:
        child = module._modules[part]
        if id(child) not in owned:
            child = twin(child)
            owned.add(id(child))
            module._modules[part] = child
        module = child
    return module


def _layer_prefix(p: "MergePlan") -> str:
    """Where the layers live in the model (`model.layers`), read from the plan's first layer tensor."""
    from evomerge.engine.checkpoints import split_layer_name

    for task in p.tasks:
        parts = split_layer_name(task.name)
        if parts is not None:
            return parts[0]
    raise ConfigError("the path has no layers", where="slices", fix="give at least one layer")


def _steps(p: "MergePlan") -> list[tuple[str, int]]:
    """(model, layer) of every output layer, in order."""
    return [(sl.sources[0].model, layer) for sl in p.slices for layer in range(sl.sources[0].start, sl.sources[0].end)]


def _place(layers: list, name: str, tensor: "torch.Tensor", prefix: str, owned: set[int]) -> None:
    """Put a materialised tensor (e.g. `model.layers.7.self_attn.o_proj.weight`) into the twin at its
    position, replacing only that tensor there."""
    from torch import nn

    from evomerge.engine.checkpoints import split_layer_name

    parts = split_layer_name(name)
    if parts is None or parts[0] != prefix:
        raise ConfigError(f"the recipe scales {name}, outside the layers; the in-memory path scales layer "
                          "tensors only", where="slices", fix="scale only layer tensors (filters such as o_proj)")
    _, position, suffix = parts
    owner_path, _, leaf = suffix.rpartition(".")
    owner = _owned(layers[position], owner_path, owned)
    owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


__all__ = ["ResidentPath", "twin"]
