#!/usr/bin/env bash
# Device checks for whoever has a CUDA GPU for a few minutes. One command, from the repo root:
#
#     bash experiments/gpu_check.sh
#
# Installs nothing. Prints the GPU and versions, runs the `gpu` tests (tests/run/test_gpu.py),
# then experiments/bench_calibration.py --device cuda at n = 256 (the paper's setting):
# FeatCal in fp32 and with TF32 block passes, Surgery, ProbSurgery. Everything printed
# also goes to results/gpu_check/<UTC time>.log, the bench table to
# results/gpu_check/<UTC time>.bench_n256.json. Every step runs under its own time limit
# (on an H200: about 2 + 2.5 minutes); the exit status is non-zero if any step failed.
# With a checkout of the official FeatCal code in .official/ (or FEATCAL_OFFICIAL_SRC), it
# also times that code against this FeatCal at n = 256 (results/bench_official.md).
#
# GPU_CHECK_DRY=1 runs the same steps on the CPU with a tiny bench workload and one quick
# test, to check this script itself on a machine without a GPU (its log is not a result).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_SILENT=true WANDB_MODE=disabled HYDRA_FULL_ERROR=1
PY=${PYTHON:-python}
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=results/gpu_check
[ "${GPU_CHECK_DRY:-0}" = 1 ] && out=${TMPDIR:-/tmp}/featcal_gpu_check_dry
mkdir -p "$out"
log="$out/$stamp.log"
exec > >(tee "$log") 2>&1

echo "== featcal gpu_check $stamp"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
nvidia-smi || echo "nvidia-smi: not available"
$PY - <<'PY'
import platform, torch, transformers, lightning
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, lightning {lightning.__version__}")
print("cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no device")
PY
device=cuda; tests=(tests/run/test_gpu.py); bench_extra=(); surgery_opts=""
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
    echo "DRY RUN on the CPU (GPU_CHECK_DRY=1): checks the script, not the GPU"
    export FEATCAL_TEST_GPU_DEVICE=cpu
    device=cpu; tests=(tests/run/test_gpu.py -k merges); bench_extra=(--tiny --experts 2); surgery_opts=":iterations=3"
elif ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: nothing to check (the gpu tests would all be skipped)"
    exit 1
fi

status=0
step() {  # step <seconds> <label> <command...>
    local limit=$1 label=$2; shift 2
    echo
    echo "== $label (limit ${limit}s)"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "== $label: exit $rc after $((SECONDS - t0))s"
    [ $rc -eq 0 ] || status=1
}

step 150 "pytest -m gpu" $PY -m pytest -q -m gpu "${tests[@]}" -p no:cacheprovider -rA -s
# one bench run at the paper's setting; each method runs in its own process, which first
# builds the 8-expert ViT-B/32 workload on the CPU (about 15-20 s of the limit each)
# featcal@$baseline: the FeatCal before GPU placement (models moved once / blocks copied
# ahead), in the same run: its time, and its fp32 parameters vs this tree's (must be < 1e-3)
baseline=${GPU_CHECK_BASELINE:-9ae9d73}
step 240 "bench n=256 (paper setting)" $PY experiments/bench_calibration.py --device $device --n 256 "${bench_extra[@]}" \
    --methods "featcal,featcal@$baseline,featcal:block_dtype=tf32,surgery$surgery_opts,probsurgery$surgery_opts" \
    --json "$out/$stamp.bench_n256.json"
step 20 "fp32 parity with featcal@$baseline (max |dtheta|/max |theta| < 1e-3)" $PY - "$out/$stamp.bench_n256.json" "$baseline" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))["results"]
row = next(r for r in results if r["method"] == f"featcal@{sys.argv[2]}")
fc = next(r for r in results if r["method"] == "featcal")
print(f"featcal {fc['seconds']:.2f} s (placement: see the log), featcal@{sys.argv[2]} {row['seconds']:.2f} s, "
      f"ratio {fc['seconds'] / row['seconds']:.2f}; parameter difference {row['param_rel_diff']:.2e}")
sys.exit(0 if row["param_rel_diff"] < 1e-3 else 1)
PY
# the authors' FeatCal on the same workload, when a checkout of it is at hand (the device
# machine has no internet: put github.com/egangu/featcal into .official/, which git ignores,
# and carry it, or point FEATCAL_OFFICIAL_SRC at one): time ratio and parameters, one run
official_src=${FEATCAL_OFFICIAL_SRC:-.official}
if [ -d "$official_src" ]; then
    step 240 "official FeatCal code vs featcal, n=256" $PY experiments/bench_calibration.py --device $device --n 256 \
        "${bench_extra[@]}" --official-src "$official_src" --methods official,featcal \
        --json "$out/$stamp.official_n256.json"
else
    echo
    echo "== official FeatCal code vs featcal: skipped (no checkout at $official_src)"
fi
step 120 "torch.profiler top operators, FeatCal n=256" $PY experiments/bench_calibration.py --device $device --n 256 \
    "${bench_extra[@]}" --methods featcal --profile 25 --json "$out/$stamp.profile_n256.json"

echo
echo "== done in ${SECONDS}s, status $status; log: $log"
exit $status
