#!/usr/bin/env bash
# One device call of several sections of scripts/device_runs.sh, each under a time cap, all inside
# the call's own limit, results under $OUT/SECTION (the device tool's OUT folder):
#
#   FMSRING_GIT_SHA=<commit> LIMIT=575 bash scripts/device_call.sh test:170 first-step:130 gemv:280
#
# `test` is `make test-gpu` with the machine's python3 ($OUT/test_gpu.log); any other name is a
# device_runs.sh section, with its own settings from the environment (INDUCTOR=..., PEERS=...).
# Wheels carried in .whl/ (ibm-fms: the device machines have none) are installed first. A section
# whose cap would pass LIMIT (seconds from the start, default 575) gets what is left and one left
# under 30 s is skipped, so a call returns what it measured before the device tool's limit stops it.
# The machine copies a working tree without git: FMSRING_GIT_SHA names the commit its rows record.
# GPU=H200 (any part of the card's name) runs nothing on another card, and exits 3 (chain what else
# the call runs with &&): the device tool may lend an H100 where an H200 was asked for, and a run
# meant for the H200 costs its time there for nothing.
set -uo pipefail
t0=$(date +%s)
limit=${LIMIT:-575}
out=${OUT:?set OUT, the folder whose files come back}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ -n "${GPU:-}" ] && ! nvidia-smi --query-gpu=name --format=csv,noheader | grep -q "$GPU"; then
    echo "[device_call] not a $GPU ($(nvidia-smi --query-gpu=name --format=csv,noheader)): nothing run"
    exit 3
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p "$out"
for item in "$@"; do
    section=${item%%:*}
    cap=${item#*:}
    left=$((limit - ($(date +%s) - t0)))
    ((cap > left - 5)) && cap=$((left - 5))
    if ((cap < 30)); then
        echo "[device_call] $section skipped: ${left} s left"
        continue
    fi
    echo "[device_call] $section: cap ${cap} s, at $(($(date +%s) - t0)) s"
    if [ "$section" = test ]; then
        timeout -k 10 "$cap" make test-gpu PY=python3 2>&1 | tee "$out/test_gpu.log" | tail -5
    else
        timeout -k 10 "$cap" bash scripts/device_runs.sh "$section" "$out/$section"
    fi
    echo "[device_call] $section: exit $?, at $(($(date +%s) - t0)) s"
done
