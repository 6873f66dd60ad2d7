#!/usr/bin/env bash
# Run a command inside a loopback-only network namespace and a private PID namespace.
#
# Why: these machines may send traffic to loopback only, and Ray advertises the machine's interface
# address even when told 127.0.0.1 (a head started by `ray start` also listens on every interface).
# Inside a network namespace whose only interface is `lo`, Ray falls back to 127.0.0.1 for everything.
# The private PID namespace matters just as much: `ray stop` kills every Ray process it can see on the
# machine, and other people run Ray here too. In here it sees only ours, and whatever is still running
# when COMMAND ends (raylets, GCS, workers) is killed by the kernel when the namespace's init exits.
#
# Usage: scripts/netns.sh [--name NAME] [--] COMMAND [ARGS...]
#   Exits with COMMAND's status (125 when the namespace cannot be set up).
#   Without --name each invocation gets a fresh, unique namespace (evo-<pid>-<random>), deleted
#   afterwards. With --name an existing namespace of that name is reused (after checking that it still
#   has only loopback) and kept; a missing one is created and kept, for later reuse.
#   Idempotent: run from inside a namespace made by this script, it runs COMMAND directly.
#   COMMAND sees RAY_AUTH_MODE=token (Ray 2.60 clients need it), RAY_AUTH_TOKEN_PATH (a fresh random
#   token for this namespace only, so `ray start` works without touching ~/.ray/auth_token),
#   RAY_TMPDIR=/tmp/evr.<name> (a private Ray temp root, so sessions never collide with anyone else's
#   /tmp/ray) and EVOMERGE_NETNS=<name>.
#   Ray's logs stay in RAY_TMPDIR when COMMAND fails (the path is printed); removed on success.
#   Not root: falls back to an unprivileged user namespace (`unshare -rn`), if the kernel allows it.
set -uo pipefail

name=""
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="${2:?--name needs a value}"; keep=1; shift 2 ;;
    --name=*) name="${1#--name=}"; keep=1; shift ;;
    --) shift; break ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [ $# -eq 0 ]; then
  echo "netns.sh: no command given. Usage: scripts/netns.sh [--name NAME] [--] COMMAND [ARGS...]" >&2
  exit 125
fi

# Interfaces other than lo that carry an address; empty means loopback-only.
foreign_interfaces() {
  ip -o addr show 2>/dev/null | awk '$2 != "lo" {print $2}' | sort -u | tr '\n' ' '
}

# Already inside one of ours (e.g. scripts/test.sh called from a script that used netns.sh): just run.
if [ -n "${EVOMERGE_NETNS:-}" ] && [ -z "$(foreign_interfaces)" ]; then
  export RAY_AUTH_MODE=token
  exec "$@"
fi

# PID 1 of the new PID namespace: runs COMMAND in the foreground (so Ctrl-C and process-group signals
# reach it directly), reaps the orphans Ray daemons leave behind, and returns COMMAND's status.
# The trailing `exit` keeps bash from exec'ing COMMAND in its place (then nothing would reap).
init='"$@"; rc=$?; exit $rc'

cmd=("$@")

make_tmp() {  # make_tmp DIR: the private Ray temp root with a fresh 256-bit token (as Ray makes them)
  mkdir -p "$1" && chmod 700 "$1" || { echo "netns.sh: cannot create $1" >&2; exit 125; }
  [ -s "$1/auth_token" ] || (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$1/auth_token")
}

# run_inside PRELUDE PREFIX...: run COMMAND under PREFIX (which enters the namespaces) with the init
# above, after the shell snippet PRELUDE; then drop the Ray temp root unless it holds logs of a failure.
run_inside() {
  local prelude="$1"; shift
  local tmp="/tmp/evr.$ns"
  make_tmp "$tmp"
  "$@" env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$tmp/auth_token" RAY_TMPDIR="$tmp" \
    EVOMERGE_NETNS="$ns" bash -c "$prelude $init" evomerge-ns-init "${cmd[@]}"
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -d "$tmp/ray" ]; then
    echo "netns.sh: command failed (exit $rc); Ray logs kept in $tmp/ray" >&2
  else
    rm -rf "$tmp"
  fi
  return "$rc"
}

if [ "$(id -u)" -ne 0 ]; then
  # Unprivileged: a user namespace owns a fresh network namespace; lo is brought up inside.
  if ! unshare --user --map-root-user --net true 2>/dev/null; then
    echo "netns.sh: not root and unprivileged user namespaces are disabled; run as root" >&2
    exit 125
  fi
  ns="${name:-evo-user-$$-$RANDOM}"
  prelude='ip link set lo up && [ -z "$(ip -o addr show | awk '"'"'$2 != "lo"'"'"')" ] ||
    { echo "netns.sh: loopback-only check failed" >&2; exit 125; };'
  run_inside "$prelude" unshare --user --map-root-user --net --pid --fork --mount-proc --kill-child
  exit $?
fi

created=0
if [ -z "$name" ]; then
  for _ in 1 2 3 4 5; do
    ns="evo-$$-$RANDOM"
    if ip netns add "$ns" 2>/dev/null; then created=1; break; fi
  done
  if [ "$created" -ne 1 ]; then echo "netns.sh: could not create a network namespace" >&2; exit 125; fi
else
  ns="$name"
  if ip netns add "$ns" 2>/dev/null; then created=1; fi
  # Exists already (ours from an earlier run, or made concurrently): reuse, checked below.
  if ! ip netns list | awk '{print $1}' | grep -qx "$ns"; then
    echo "netns.sh: could not create or find network namespace '$ns'" >&2; exit 125
  fi
fi

cleanup() {
  if [ "$keep" -eq 0 ] && [ "$created" -eq 1 ]; then
    # Anything still in the namespace was started in it by us (the PID namespace is gone already,
    # unless someone else entered it): end it, then delete the namespace.
    local pids
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then
      kill $pids 2>/dev/null || true; sleep 1
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    fi
    ip netns del "$ns" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns exec "$ns" ip link set lo up || { echo "netns.sh: cannot bring lo up in $ns" >&2; exit 125; }
foreign=$(ip netns exec "$ns" ip -o addr show | awk '$2 != "lo" {print $2}' | sort -u | tr '\n' ' ')
if [ -n "$foreign" ]; then
  echo "netns.sh: namespace '$ns' has interfaces other than lo ($foreign); refusing to run" >&2
  exit 125
fi

run_inside "" ip netns exec "$ns" unshare --pid --fork --mount-proc --kill-child
exit $?
