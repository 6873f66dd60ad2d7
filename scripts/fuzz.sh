#!/usr/bin/env bash
# The full fuzz pass (issue 26): the same mutations of the repository's recipes, MoE configs and search
# spaces that tests/test_fuzz.py feeds to `evomerge validate` / `merge` / `moe` in CI (a few hundred
# cases), with many more cases. Every case must answer with exit 0 or 2 and no traceback.
#
# Usage: scripts/fuzz.sh [EXAMPLES]     (default 3000 per recipe and MoE test, a tenth of that for spaces)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EVOMERGE_FUZZ_EXAMPLES="${1:-3000}" exec "$ROOT/scripts/test.sh" "$ROOT/tests/test_fuzz.py" -q -p no:cacheprovider
