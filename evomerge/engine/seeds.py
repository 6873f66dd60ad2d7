"""Seeds: the one range every seed a user gives must fit, and the default.

Why it exists: a seed reaches numpy's generator (Optuna's samplers: 0 to 2**32 - 1) and torch's (DARE's
drops, MoE router draws), and a seed either one refuses crashes deep inside it, after files were written.
Every schema that takes a seed (recipes, MoE configs, search spaces, splits) types it as `Seed`, so a
value out of range is refused where it enters, with the field's name.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

DEFAULT_SEED = 0
MAX_SEED = 2**32 - 1  # numpy's limit, the narrower of the two
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
