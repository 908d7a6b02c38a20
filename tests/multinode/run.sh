#!/usr/bin/env bash
# `make test-multinode`: the two-node test (tests/multinode/test_two_nodes.py), as root. It builds two
# network namespaces with an sshd each (tests/multinode/cluster.py) and removes them when it ends; this
# wrapper's trap sweeps whatever an interrupted or killed run left (namespaces, their processes, /etc/netns
# entries, keys), so `ip netns list` is as before afterwards. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
# absolute (the nodes' commands run from other folders), the venv's own path kept (no symlink resolved)
case "$PY" in */*) ;; *) PY="$(command -v "$PY")" ;; esac
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
export PYTHON="$PY"
LOOP_MEGATRON_MULTINODE=1 "$PY" -m pytest -q -s -p no:cacheprovider tests/multinode "$@" &
pid=$!
sweep() { "$PY" tests/multinode/cluster.py --cleanup "lm$pid"; }
trap 'kill -TERM "$pid" 2>/dev/null; wait "$pid"; sweep; exit 130' INT TERM HUP
wait "$pid"
status=$?
sweep
exit "$status"
