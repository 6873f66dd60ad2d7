"""evomerge: search model-merge recipes and export them as mergekit-compatible YAML.

Importing the package is cheap on purpose: heavy libraries (torch, transformers, lm_eval, ray,
optuna) are imported only by the modules that need them, so `evomerge --help` stays fast.
"""

__version__ = "0.1.0"
