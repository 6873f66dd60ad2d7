"""The embedded toy model family: a tiny trained base, one expert per skill, lm-eval tasks over them.

What it holds: `family.py` (the shipped family: `family()`, `load()`, `build()`, `ToyFamily`),
`skills.py` (the skills' data generators), `training.py` (deterministic training of the base and the
experts) and `data/` (the committed family, shipped as package data; `evomerge toy path` prints it).

What it may import: `evomerge.errors` and third-party libraries, nothing from the other rooms: the
family is data that the search and the tests consume (tests/test_architecture.py).

Public API: `from evomerge.toy.family import family, build, load, ToyFamily` (the module is not
re-exported here, so that `evomerge.toy.family` always names the module, never the function).
"""
