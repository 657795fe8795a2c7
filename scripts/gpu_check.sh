#!/usr/bin/env bash
# The checks that need a GPU, in one command: the tests on CUDA and the benchmarks at GPU sizes.
#
#   scripts/gpu_check.sh [STAGE...]        (default: gpu-tests lookup models)
#
# First, whatever the stages, the static check: python -m benchmarks.kernels_static compiles
# every Triton kernel of ops/ with the wheel's ptxas (no GPU needed; before device stages for
# sm_90 only) and fails on a compile error or a spill; a failure stops the script before any
# device time is spent (a Triton too old for the checker is reported and does not stop it).
# `scripts/gpu_check.sh static` runs only that, for sm_80 and sm_90, on any machine: do it
# before borrowing a GPU.
#
# Stages (sized to fit one 10-minute device command each on an H100; run them as separate calls):
#   static        only the static check (no CUDA needed)
#   gpu-tests     pytest -m gpu: the CUDA tests at realistic sizes (a minute or two)
#   tests         the whole suite on CUDA (tests/recipes left out when torchtitan is missing)
#   lookup        python -m benchmarks.lookup: the default CUDA sweep (N 64K..16M, D 256..4096,
#                 bf16 and fp32, every impl, product_key_topk)
#   models        python -m benchmarks.models --bases 134m (dense / Memory / Memory+, eager and
#                 compiled, bf16 autocast)
#   models-large  the same for 373m and 1b (batch 2: the 1b Memory+ twin needs ~60 GB)
#   value-step    python -m benchmarks.value_step: one training step of a bf16 table alone, dense
#                 AdamW vs row-sparse (N 1M and 16M, D 1024 and 2048; what does not fit is skipped)
#
# Results go to $OUT when set (the device tool brings back what is written there), else to
# benchmarks/out/ (git-ignored): <stage>.log, and <stage>.json / <stage>.png for benchmarks.
#
# The GPU machine has torch, triton, pytest, hypothesis and matplotlib but no network and no
# tyro. So the repo runs in place through PYTHONPATH (no `pip install -e`, whose build isolation
# would need the network), and tyro travels as wheels in .whl/ (ignored through
# .git/info/exclude, never committed). Make them here, where pip works:
#   echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: -d .whl \
#       tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
# and name .whl in the device tool's `carry`. Record what you measure in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

stages=("$@")
[ "${#stages[@]}" -gt 0 ] || stages=(gpu-tests lookup models)
for stage in "${stages[@]}"; do
    case "$stage" in
        static | gpu-tests | tests | lookup | models | models-large | value-step) ;;
        *) echo "unknown stage '$stage': expected static, gpu-tests, tests, lookup, models," \
                "models-large or value-step" >&2
           exit 2 ;;
    esac
done

out="${OUT:-benchmarks/out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --root-user-action=ignore --target /tmp/gpu_check_site .whl/*.whl
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "=== static"
jobs=$(( $(nproc) < 8 ? $(nproc) : 8 ))
# Before device stages only the GPU's own arch (sm_90): device time is scarce, and the CPU box
# checks both archs in CI.
archs=(80 90)
[ "${stages[*]}" = static ] || archs=(90)
static=0
python3 -m benchmarks.kernels_static --jobs "$jobs" --archs "${archs[@]}" \
    --out "$out/static.json" >"$out/static.log" 2>&1 || static=$?
case "$static" in
    0) grep -E "^[0-9]+ cases, [0-9]+ failures" "$out/static.log" ;;
    3) # This Triton cannot run the check (an older one lacks the internals it binds with): a
       # limit of the checker, not a finding, so the device stages still run.
       cat "$out/static.log" >&2
       echo "gpu_check.sh: static check not available with this Triton; run it on the CPU box" >&2
       [ "${stages[*]}" != static ] || exit 3 ;;
    *) tail -n 20 "$out/static.log"
       echo "gpu_check.sh: the static kernel check failed (see $out/static.log): no device stage run" >&2
       exit 1 ;;
esac
[ "${stages[*]}" != static ] || exit 0

python3 - <<'EOF'
import torch, triton, tyro
assert torch.cuda.is_available(), "gpu_check.sh: no CUDA device visible to torch"
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
EOF

run_stage() {
    case "$1" in
        gpu-tests)
            python3 -m pytest -q -m gpu tests ;;
        tests)
            local skip=()
            if ! python3 -c "import torchtitan" 2>/dev/null; then
                echo "torchtitan is not installed: leaving out tests/recipes"
                skip=(--ignore=tests/recipes)
            fi
            python3 -m pytest -q tests "${skip[@]}" ;;
        lookup)
            python3 -m benchmarks.lookup --out "$out/lookup.json" --plot "$out/lookup.png" ;;
        models)
            python3 -m benchmarks.models --bases 134m \
                --out "$out/models.json" --plot "$out/models.png" ;;
        models-large)
            python3 -m benchmarks.models --bases 373m 1b --batch-size 2 \
                --out "$out/models-large.json" --plot "$out/models-large.png" ;;
        value-step)
            for dim in 1024 2048; do
                python3 -m benchmarks.value_step --rows 1000000 16000000 --dim "$dim" \
                    --dtype bf16 --out "$out/value-step-d$dim.json"
            done ;;
    esac
}

# Every stage runs even if an earlier one fails; the exit status says whether all passed.
status=0
for stage in "${stages[@]}"; do
    [ "$stage" != static ] || continue  # done above
    echo "=== $stage"
    run_stage "$stage" 2>&1 | tee "$out/$stage.log" || status=1
done
exit "$status"
