#!/usr/bin/env bash
# The project's test command: the whole pytest suite, inside a loopback-only network namespace.
#
# Why a namespace: the Ray tests start real clusters, and Ray advertises the machine's interface address
# even when told 127.0.0.1; these machines may send traffic to loopback only. scripts/netns.sh gives the
# run a namespace with only `lo` (and a private PID namespace, so `ray stop` only sees our processes).
#
# Usage: scripts/test.sh [PYTEST ARGS...]      (from any folder; uses the repo's .venv)
#   scripts/test.sh                           the whole suite
#   scripts/test.sh tests/test_ray.py -x      file paths may be relative to the repo or to your folder
#   scripts/test.sh -m "not slow"             any pytest option passes through
# Exit status: pytest's (0 all passed, 1 failures, 5 no tests collected, ...); 125 if the namespace
# cannot be set up. Needs root (or unprivileged user namespaces) for the namespace.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
if [ ! -x "$PY" ]; then
  echo "test.sh: $PY not found; run scripts/setup.sh first" >&2
  exit 2
fi

# Paths given relative to the caller's folder keep working after we cd to the repo root
# (pytest reads pyproject.toml and testpaths from there). `file.py::test_name` is handled too.
args=()
for a in "$@"; do
  path="${a%%::*}"
  if [ -n "$path" ] && [ "${path:0:1}" != "-" ] && [ "${path:0:1}" != "/" ] && [ -e "$path" ]; then
    a="$(cd "$(dirname "$path")" && pwd)/$(basename "$path")${a:${#path}}"
  fi
  args+=("$a")
done

cd "$ROOT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1

# The ten slowest tests are printed with every run (CI included), so slow creep is seen.
"$ROOT/scripts/netns.sh" -- "$PY" -m pytest --durations=10 "${args[@]}"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests (exit 5); treated as a failure" >&2
fi
exit "$rc"
