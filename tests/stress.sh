#!/usr/bin/env bash
# The distributed tests (pytest -m distributed: every test that starts torchrun/gloo process groups) N times
# in a row while busy loops keep every core loaded, stopping at the first failure. Flaky shutdown races
# (a process aborting at exit, a rank tearing down while another still talks) show up under load.
#
#   tests/stress.sh [N]        N rounds (default 20); run by `make stress` (STRESS_N=5 make stress)
#   PYTHON=.venv/bin/python    the interpreter (default: python)
#   STRESS_LOAD=2              busy loops beside the tests (default: one per core, nproc)
#   extra pytest arguments: STRESS_PYTEST_ARGS="-k classify"
set -euo pipefail

rounds=${1:-20}
python=${PYTHON:-python}
load=${STRESS_LOAD:-$(nproc)}
read -r -a extra <<<"${STRESS_PYTEST_ARGS:-}"

load_pids=()
stop_load() {
    for pid in "${load_pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${load_pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap stop_load EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for _ in $(seq "$load"); do
    "$python" -c "while True: pass" &
    load_pids+=("$!")
done
echo "stress: ${rounds} rounds of pytest -m distributed beside ${load} busy loops (pids ${load_pids[*]})"

passed=0
start=$(date +%s)
for round in $(seq "$rounds"); do
    t0=$(date +%s)
    if ! "$python" -m pytest -m distributed -x -q -p no:cacheprovider "${extra[@]}"; then
        echo "stress: round ${round} FAILED after $(($(date +%s) - t0)) s; ${passed}/${rounds} passed"
        exit 1
    fi
    passed=$((passed + 1))
    echo "stress: round ${round}/${rounds} passed in $(($(date +%s) - t0)) s"
done
total=$(($(date +%s) - start))
echo "stress: ${passed}/${rounds} passed (${total} s, $((total / rounds)) s per round, ${load} busy loops)"
