#!/usr/bin/env bash
# The GPU runs behind README.md and docs/performance.md, one section per device call,
# all GPUs of the machine, LLaMA-3-8B shapes with seeded random weights:
#
#   scripts/device_runs.sh SECTION OUT_DIR
#
# (scripts/device_call.sh runs several sections in one call of the device tool, each under a cap)
#
# prefill   GPU tests, then prefill 8K-128K: single, ring, tp, torch_cp (peers fused, their best
#           SDPA backend) and single as FMS ships it at 128K
# decode    32 greedy tokens at 32K and 128K: single, ring, tp; ring's 128K prefill in 64K-token
#           chunks; a 1K-token follow-up on 128K cached
# followup  T new tokens on P cached: single, tp, ring auto / pass_kv / pass_q, and ring's fresh P+T prefill
# scaling   prefill at 128K: single, ring, tp, torch_cp (run on 4 GPUs)
# fp32      the earlier project's setting: float32, 6998 tokens and 32K, single, ring, tp, torch_cp
# interconnect  prefill 32K and 128K, every peer, over NVLink and then with NCCL_P2P_DISABLE=1
#           (NCCL through host memory: a PCIe-class link); rows say which in `interconnect`; then ring
#           through host memory with TORCH_NCCL_HIGH_PRIORITY=1 (results_pcie_like_high_priority.csv)
# mesh      ring x tensor parallel, every factorisation cp x tp of the GPUs beside single, tp and
#           torch_cp: prefill and decode at 8K (checked against single) and 128K
# ladder    1M-token prompts generating 8 tokens, ring at every factorisation cp x tp of the GPUs
#           (no allocator setting here: the bench sets expandable segments itself)
# layers    decode with whole decoder layers compiled (the default) against modules compiled one by
#           one (ring_fuse_layers=false): the 32K step profiled (kernels, kernel time) on all GPUs;
#           every factorisation cp x tp checked against single at 8K; 32 tokens at 128K for every
#           factorisation, and modules-only for 4x1 and 1x4
# decodefloor  the decode-at-the-floor targets: ring at every factorisation cp x tp at 32K and 128K and
#           at batch 4 and 32K, then single and tp at 32K and 128K (32 tokens, unchecked: layers checks)
# ttft1m    a 1M-token prompt on the ring alone: its no-cache prefill and its generation (time to first
#           token, then 8 tokens) in one launch; 8K rows first, so the 1M rows run compiled code warm
# mesh70b   LLaMA-2-70B shapes (FMS llama/70b; NLAYERS=n to cut layers where 80 do not fit):
#           ring 2x2 (and 1x4) against FMS TP at 32K and 128K, prefill and decode
# padded    a padded batch's generation: prefill (its mask as segments; ttft_ms) and captured decode
#           step, ring at every factorisation cp x tp, batch 4 at 8K and 32K, unpadded and then
#           left-padded (--padding 0.5: the 4 prompts keep 100%, 83%, 67%, 50%), checked against single
# ladder70b the longest prompt that generates, LLaMA-2-70B shapes: FMS TP at 256K (past its limit
#           as its 32K/128K peaks extrapolate) and ring 2x2 at 512K, twice that rung, 8 tokens each
# same, same-followup  one GPU's speed before and after a change, single and ring at world 1:
#           prefill and decode (32 greedy tokens) at 8K/32K/128K in one launch, then follow-ups of 1K
#           and 8K tokens on 32K and 128K cached. Run each section in the old tree and the new one on one
#           machine (cd OLD && bash NEW/scripts/device_runs.sh same OUT/old) and compare the two CSVs;
#           PEERS and SEQ_LENS narrow them where a device call's time is short
# compiled  decode (32 greedy tokens) at 8K/32K/128K: single eager and compiled as FMS's inference script
#           compiles it (COMPILE_PEERS, default `default`: FMS's growing cache leaves CUDA graphs
#           nothing fixed to replay) beside ring
# targets   the one-GPU targets of one run: decode (32 greedy tokens) at 8K/32K/128K of FMS eager,
#           FMS compiled (COMPILE_PEERS, default `default`) and ring; follow-ups of 512 and 1K tokens
#           on 32K and 128K cached, the same peers; ring at batch 4, 8K and 32K, unpadded and then
#           left-padded (--padding 0.5, checked against single, whose padded rows are the padded peer);
#           PARTS (default "peers ring followup batch padded") picks those launches, since all of them
#           take ~13 minutes on one H200 and a device call at most 10; the decode rows are two launches,
#           "peers" and "ring", so a call short of time can measure ring's first
# decode-ring  the ring's own decode rows of `targets`, no peers: 8K/32K/128K, and batch 4 at 32K
#           unpadded and padded; in an old tree and the new one on one machine (as `same`), a change's
#           effect on every decode target in ~2 minutes a tree. LAUNCHES=n runs the three launches n
#           times (drained rows move by up to ~0.3 ms between launches of the same code)
# gemv      the decode step's four projections alone (LLaMA-3-8B, batch 1 and 4): cuBLAS as the step
#           calls it, alone and with its layer's elementwise work compiled around it (RMSNorm before,
#           residual or SwiGLU after), against a Triton GEMV, plain and with that work fused, every
#           configuration (scripts/gemv_sweep.py, gemv.csv)
# decode-kernel  fmsring's decode attention alone (scripts/decode_kernel_sweep.py, decode_kernels.csv):
#           chunk counts and tile configurations per shape, one GPU's shapes first, against flash
# followup-whole  short follow-ups (512 and 1K tokens on 32K and 128K cached) on the ring at world 1,
#           each decoder layer compiled whole (the default) against module by module
#           (ring_fuse_layers=false, variant `modules`)
# followup-profile  where a short follow-up's time goes: its largest block (T queries over P cached
#           keys) alone through cuDNN, flash and the memory-efficient kernel, the keys as the cache
#           holds them and heads-major (scripts/gpu_probe.py followup, probe.json); then
#           scripts/profile_followup.py: ring at world W on 128K cached + 512 new and 32K cached + 1K
#           new, kernels, idle stream and host ops
# first-step  ring's 8K decode in two fresh processes over one empty compile cache: the second launch's
#           first step finds the first's compiled code on disk (first_step_ms: what a user's second run
#           pays), rows in results_first_step.csv, the bench run by scripts/profile_first_step.py --bench
#           so that its first step is split into tracing, backend, loading, garbage collections and
#           capture (first_step_bench-launch*); then the script's own step twice over another empty
#           cache, split the same way (first_step_launch*); each mode's third launch under cProfile
#           (first_step_*launch3: its top functions, where the time outside dynamo's phases goes).
#           PROFILED="2 3" profiles those launches instead, MODES=bench (or script) runs one mode,
#           COLLECT_AT_LOAD=1 adds a full collection after loading (--collect-at-load)
# inductor  ring decode (32 greedy tokens) at 8K/32K/128K as it is, then under each setting of INDUCTOR
#           (space-separated, one launch each over an empty compile cache; default
#           "TORCHINDUCTOR_ENABLE_PDL=1 combo_kernels=True"): an upper-case NAME=value is an environment
#           variable, a lower-case one an inductor option (scripts/inductor_options.py); settings joined
#           by + run together in one launch (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1+max_autotune_pointwise=True:
#           a tuned kernel's several configurations, so the cache's check keeps it). PDL overlaps
#           a kernel's launch with the tail of the one before (the gaps between a step's ~530
#           kernels); combo kernels launch independent small kernels as one (RoPE, the cache writes).
#           Rows in results_inductor.csv, their variant naming the setting; the 32K step as it is
#           profiled (step/decode_profile_rank0.json: kernels, and the host's part of a step).
#           LAUNCHES=2: each setting launched twice over its cache (the second launch's first_step_ms
#           is a second process's first step); TESTS=1: make test-gpu's tests under each setting
#           first (test_gpu_<setting>.log), since a setting can change the numbers as well as the time
# decode-profile  that 32K step profiled alone (decode_profile_rank0.json)
# decode-profile-batch  the 32K step at batch 4, unpadded and then left-padded (--padding 0.5 as the
#           bench's), profiled the same way (decode_profile_b4_pad*_rank0.json): where a padded step's
#           extra goes, the host's part by function (PADDINGS: other fractions, space-separated)
# families  Bamba-9.8B and gpt-oss-20b shapes beside FMS's own model (single) at world 1: a window
#           layer's attention against a full layer's at 32K (scripts/profile_windows.py), Bamba prefill
#           and decode at 8K, 32K and 128K, gpt-oss prefill at 8K and 32K and the ring's decode at 32K
#
# fp32 and interconnect take PEERS=ring,tp,torch_cp to leave out `single` (and the check against
# it): the same section on fewer GPUs of the same machine (CUDA_VISIBLE_DEVICES=0,1) appending to
# the same CSV, whose `single` rows are then the one-GPU baseline of both world sizes
set -uo pipefail  # one bench's failed rows (e.g. out of memory) must not stop the next
section=$1
out=$2
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the scripts/ run from the tree in the working directory, not an installed one
nproc=$(python3 -c "import torch; print(torch.cuda.device_count())")
status=0
architecture=llama
variant=3-8b
peers=${PEERS:-single,ring,tp,torch_cp}
unchecked=$([[ $peers == *single* ]] || echo --no-check)
factors=$(python3 -c "print(','.join(str(t) for t in range(1, $nproc + 1) if $nproc % t == 0))")  # every cp x tp
bench_module=(-m fmsring.bench)
bench() {
    torchrun --standalone --nproc_per_node="$nproc" "${bench_module[@]}" --architecture "$architecture" --variant "$variant" \
        --device cuda --dtype bfloat16 "$@" 2>&1 | grep -v "^W.*torch/distributed/run.py" | tee -a "$out/bench_$section.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" != 0 ]; then
        echo "[device_runs] a bench exited $rc: see the status and error columns of its rows"
        status=1
    fi
}
profile_step() {  # OUT [RING_TP BATCH PADDING]: the 32K step at world 1: kernels, the host's part, the graph alone
    torchrun --standalone --nproc_per_node="$nproc" scripts/profile_decode.py "$1" 32768 1 "${@:2}" 2>&1 \
        | grep -v "^W.*torch/distributed/run.py" | tee -a "$out/bench_$section.log" | grep -v '^ *"' || status=1
}
case $section in
prefill)
    python3 -m pytest -q -p no:cacheprovider -p no:logging -m cuda tests/test_gpu.py tests/harness/test_ceilings.py 2>&1 | tail -3
    bench --strategies single,ring,tp,torch_cp --phases prefill --seq-lens 8K,32K,64K,128K \
        --repeats 3 --warmup 1 --out "$out/results.csv"
    bench --strategies single --as-shipped --phases prefill --seq-lens 128K --repeats 3 --warmup 1 \
        --out "$out/results.csv" --resume
    ;;
decode)
    bench --strategies single,ring,tp --phases decode --seq-lens 32K,128K --decode-tokens 32 \
        --repeats 1 --warmup 1 --out "$out/results.csv"
    bench --strategies ring --phases prefill --seq-lens 128K --no-check \
        --ring-variants '{"chunk64K": {"ring_prefill_chunk": 65536}}' --repeats 2 --warmup 1 --out "$out/results.csv"
    bench --strategies single,ring,tp --phases followup --cached-lens 128K --seq-lens 1K --no-followup-recompute \
        --ring-variants '{"": {}, "pass_kv": {"ring_followup": "pass_kv"}, "pass_q": {"ring_followup": "pass_q"}}' \
        --repeats 2 --warmup 1 --out "$out/results.csv"
    ;;
followup)
    # ring's default (auto) rows are checked against single and come with the fresh P+T prefill;
    # the forced variants only change which ring pass runs
    bench --strategies single,ring,tp --phases followup --cached-lens 32K,128K --seq-lens 512,4K,8K,32K \
        --repeats 2 --warmup 1 --out "$out/results.csv"
    bench --strategies ring --phases followup --cached-lens 32K,128K --seq-lens 512,4K,8K,32K \
        --ring-variants '{"pass_kv": {"ring_followup": "pass_kv"}, "pass_q": {"ring_followup": "pass_q"}}' \
        --no-check --no-followup-recompute --repeats 2 --warmup 1 --out "$out/results.csv"
    ;;
scaling)
    bench --strategies single,ring,tp,torch_cp --phases prefill --seq-lens 128K --repeats 2 --warmup 1 \
        --out "$out/results.csv"
    ;;
fp32)
    bench --dtype float32 --strategies "$peers" --phases prefill --seq-lens 6998,32K \
        --repeats 2 --warmup 1 $unchecked --out "$out/results_fp32.csv"
    ;;
interconnect)
    bench --strategies "$peers" --phases prefill --seq-lens 32K,128K --repeats 2 --warmup 1 $unchecked \
        --out "$out/results.csv"
    NCCL_P2P_DISABLE=1 bench --strategies ring,tp,torch_cp --phases prefill --seq-lens 32K,128K --repeats 2 \
        --warmup 1 --no-check --out "$out/results_pcie_like.csv"
    # is the ring's overlap over host memory lost to SM starvation? NCCL's kernels at high priority
    NCCL_P2P_DISABLE=1 TORCH_NCCL_HIGH_PRIORITY=1 bench --strategies ring --phases prefill --seq-lens 32K,128K \
        --repeats 2 --warmup 1 --no-check --out "$out/results_pcie_like_high_priority.csv"
    ;;
mesh)
    bench --strategies single,tp,torch_cp,ring --ring-tp "$factors" --phases prefill,decode --seq-lens 8K,128K \
        --decode-tokens 32 --repeats 2 --warmup 1 --out "$out/results.csv"
    ;;
ladder)
    bench --strategies ring --ring-tp "$factors" --phases decode --seq-lens 1M --decode-tokens 8 --repeats 1 \
        --warmup 0 --no-check --timeout-s 900 --out "$out/results.csv"
    ;;
layers)
    torchrun --standalone --nproc_per_node="$nproc" scripts/profile_decode.py "$out" 32768 2 2>&1 \
        | grep -v "^W.*torch/distributed/run.py" | tee -a "$out/bench_$section.log" | grep -v '^ *"' || status=1
    bench --strategies single,ring --ring-tp "$factors" --phases decode --seq-lens 8K --decode-tokens 8 \
        --repeats 1 --warmup 0 --out "$out/results.csv"
    bench --strategies ring --ring-tp "$factors" --phases decode --seq-lens 128K --decode-tokens 32 --no-check \
        --repeats 2 --warmup 1 --out "$out/results.csv"
    bench --strategies ring --ring-tp "1,$nproc" --phases decode --seq-lens 128K --decode-tokens 32 --no-check \
        --ring-variants '{"modules": {"ring_fuse_layers": false}}' --repeats 2 --warmup 1 --out "$out/results.csv"
    ;;
decodefloor)
    steps=(--phases decode --decode-tokens 32 --repeats 1 --warmup 1 --no-check --out "$out/results.csv")
    bench --strategies ring --ring-tp "$factors" --seq-lens 32K,128K "${steps[@]}"
    bench --strategies ring --ring-tp "$factors" --seq-lens 32K --batch 4 "${steps[@]}"
    bench --strategies single,tp --seq-lens 32K,128K "${steps[@]}"
    ;;
ttft1m)
    bench --strategies ring --phases prefill,decode --seq-lens 8K,1M --decode-tokens 8 --repeats 1 --warmup 0 \
        --no-check --timeout-s 900 --out "$out/results.csv"
    ;;
mesh70b)
    # no `single` (the whole model does not fit one GPU), so nothing to check against: unchecked,
    # every TP shard keeps its own random draw, which changes no shape and no time
    variant=70b
    layers=()
    [ -n "${NLAYERS:-}" ] && layers=(--model-kwargs "{\"nlayers\": $NLAYERS}")
    bench --strategies ring,tp --ring-tp 2,4 --phases prefill,decode --seq-lens 32K,128K --no-check \
        --decode-tokens 16 --repeats 1 --warmup 1 "${layers[@]}" --out "$out/results.csv"
    ;;
padded)
    steps=(--phases decode --seq-lens 8K,32K --batch 4 --decode-tokens 32 --repeats 1 --warmup 1 --out "$out/results.csv")
    bench --strategies ring --ring-tp "$factors" --no-check "${steps[@]}"
    bench --strategies single,ring --ring-tp "$factors" --padding 0.5 "${steps[@]}"
    ;;
same)
    bench --strategies "${PEERS:-single,ring}" --phases prefill,decode --seq-lens "${SEQ_LENS:-8K,32K,128K}" \
        --decode-tokens 32 --no-check \
        --repeats 2 --warmup 1 --out "$out/results.csv"
    ;;
same-followup)
    bench --strategies "${PEERS:-single,ring}" --phases followup --cached-lens 32K,128K --seq-lens 1K,8K \
        --no-followup-recompute --no-check --repeats 2 --warmup 1 --out "$out/results.csv"
    ;;
compiled)
    bench --strategies single,ring --compile-peers "${COMPILE_PEERS:-default}" --phases decode \
        --seq-lens 8K,32K,128K --decode-tokens 32 --no-check --repeats 1 --warmup 1 --out "$out/results.csv"
    ;;
targets)
    steps=(--repeats 1 --warmup 1 --out "$out/results.csv")
    compiled=(--compile-peers "${COMPILE_PEERS:-default}")
    decode=(--phases decode --seq-lens 8K,32K,128K --decode-tokens 32 --no-check)
    batch4=(--phases decode --seq-lens 8K,32K --batch 4 --decode-tokens 32)
    for part in ${PARTS:-peers ring followup batch padded}; do
        case $part in
        peers) bench --strategies single "${compiled[@]}" "${decode[@]}" "${steps[@]}" ;;
        ring) bench --strategies ring "${decode[@]}" "${steps[@]}" ;;
        followup)
            bench --strategies single,ring "${compiled[@]}" --phases followup --cached-lens 32K,128K --seq-lens 512,1K \
                --no-followup-recompute --no-check "${steps[@]}"
            ;;
        batch) bench --strategies ring "${batch4[@]}" --no-check "${steps[@]}" ;;
        padded) bench --strategies single,ring "${batch4[@]}" --padding 0.5 "${steps[@]}" ;;
        *) echo "[device_runs] targets has no part $part" && status=1 ;;
        esac
    done
    ;;
decode-ring)
    steps=(--strategies ring --phases decode --decode-tokens 32 --no-check --repeats 1 --warmup 1 --out "$out/results.csv")
    for _ in $(seq "${LAUNCHES:-1}"); do
        bench --seq-lens 8K,32K,128K "${steps[@]}"
        bench --seq-lens 32K --batch 4 "${steps[@]}"
        bench --seq-lens 32K --batch 4 --padding 0.5 "${steps[@]}"
    done
    ;;
decode-kernel)
    python3 scripts/decode_kernel_sweep.py "$out/decode_kernels.csv" 2>&1 | tee -a "$out/bench_$section.log" || status=1
    ;;
gemv)
    python3 scripts/gemv_sweep.py "$out/gemv.csv" 2>&1 | tee -a "$out/bench_$section.log" || status=1
    ;;
followup-whole)
    bench --strategies ring --phases followup --cached-lens 32K,128K --seq-lens 512,1K --no-followup-recompute \
        --no-check --ring-variants '{"": {}, "modules": {"ring_fuse_layers": false}}' --repeats 2 --warmup 1 \
        --out "$out/results.csv"
    ;;
followup-profile)
    torchrun --standalone --nproc_per_node=1 scripts/gpu_probe.py "$out" followup 2>&1 \
        | grep -v "^W.*torch/distributed/run.py" | tee -a "$out/bench_$section.log" | grep followup_ || status=1
    for point in "131072 512" "32768 1024"; do
        # shellcheck disable=SC2086  # the point is two arguments
        torchrun --standalone --nproc_per_node="$nproc" scripts/profile_followup.py "$out" $point 2>&1 \
            | grep -v "^W.*torch/distributed/run.py" | tee -a "$out/bench_$section.log" | grep -v '^ *"' || status=1
    done
    ;;
first-step)
    for mode in ${MODES:-bench script}; do  # the bench's step, then the script's own, each over a cache of its own
        mode=$([ "$mode" = bench ] && echo --bench)
        TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
        export TORCHINDUCTOR_CACHE_DIR
        for launch in 1 2 3; do
            profiled=$([[ " ${PROFILED:-3} " == *" $launch "* ]] && echo --cprofile)
            # shellcheck disable=SC2086  # an empty mode is no argument
            torchrun --standalone --nproc_per_node="$nproc" scripts/profile_first_step.py "$out" \
                "${mode:+bench-}launch$launch" 8192 $mode $profiled ${COLLECT_AT_LOAD:+--collect-at-load} 2>&1 \
                | grep -v "^W.*torch/distributed/run.py" | tee -a "$out/bench_$section.log" | grep -v '^ *"' || status=1
        done
    done
    ;;
inductor)
    mkdir -p "$out/step"
    profile_step "$out/step"
    for setting in "" ${INDUCTOR:-TORCHINDUCTOR_ENABLE_PDL=1 combo_kernels=True}; do
        (  # a subshell: the setting and a compile cache of its own stay with this launch
            export TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)"
            options=()  # an inductor option goes through scripts/inductor_options.py, for the tests and the bench alike
            IFS=+ read -ra parts <<<"$setting"
            for part in "${parts[@]}"; do
                case $part in
                [A-Z]*) export "${part?}" ;;
                ?*) options+=("$part") ;;
                esac
            done
            ((${#options[@]})) && options=(scripts/inductor_options.py "${options[@]}")
            bench_module=("${options[@]}" -m fmsring.bench)
            if [ "${TESTS:-0}" = 1 ] && [ -n "$setting" ]; then
                make test-gpu PY="python3 ${options[*]}" >"$out/test_gpu_$setting.log" 2>&1 || status=1
                tail -1 "$out/test_gpu_$setting.log"
            fi
            for _ in $(seq "${LAUNCHES:-1}"); do
                # the setting is the rows' variant (a ring variant of no options), so no table takes them for another's
                bench --strategies ring --phases decode --seq-lens 8K,32K,128K --decode-tokens 32 --no-check \
                    --ring-variants "{\"$setting\": {}}" --repeats 1 --warmup 1 --out "$out/results_inductor.csv"
            done
            exit "$status"
        ) || status=1
    done
    ;;
decode-profile)
    profile_step "$out"
    ;;
decode-profile-batch)
    for padding in ${PADDINGS:-0 0.5}; do
        profile_step "$out" 1 4 "$padding"
    done
    ;;
families)
    python3 scripts/profile_windows.py "$out" 32768 128 2>&1 | tee -a "$out/bench_$section.log" || status=1
    architecture=bamba variant=9_8b  # FMS's own scan holds n^2/2 bytes per layer: 8K is the longest it runs
    bench --strategies single,ring --phases prefill,decode --seq-lens 8K,32K,128K --decode-tokens 16 --repeats 2 \
        --warmup 1 --out "$out/results.csv"
    architecture=gpt_oss variant=20b
    bench --strategies single,ring --phases prefill --seq-lens 8K,32K --repeats 2 --warmup 1 --out "$out/results.csv"
    bench --strategies ring --phases decode --seq-lens 32K --decode-tokens 16 --repeats 1 --warmup 1 --no-check \
        --out "$out/results.csv"
    ;;
ladder70b)
    variant=70b
    rung=(--phases decode --decode-tokens 8 --repeats 1 --warmup 0 --no-check --timeout-s 900 --out "$out/results.csv")
    bench --strategies tp --seq-lens 256K "${rung[@]}"
    bench --strategies ring --ring-tp 2 --seq-lens 512K "${rung[@]}"
    ;;
*)
    echo "unknown section $section" >&2
    exit 2
    ;;
esac
exit $status
