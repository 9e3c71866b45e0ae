#!/usr/bin/env bash
# GPU step benchmark in one go: SD1.5 at 512 px and SDXL at 1024 px (random weights, bf16, batch 1, LoRA rank 32 on
# UNet + text encoders, AdamW), with and without gradient checkpointing; then the reference step, this project's
# plain step and its APT step side by side at batch 1 and 4 (bench/apt_overhead.py). Run from the repository root:
#
#   bash bench/gpu_check.sh                 # writes $OUT/step_time-gpu.md and $OUT/apt_overhead-gpu.md
#                                           # (OUT defaults to bench/results)
#   bash bench/gpu_check.sh --dry-run       # no GPU needed: the same flow on the tiny CPU configs, 1 step each,
#                                           # into $OUT/step_time-dryrun.md and $OUT/apt_overhead-dryrun.md
#                                           # (OUT defaults to a temporary folder)
#
# What it does:
#   1. Prints the machine (nvidia-smi, torch, CUDA) into env.txt (in $OUT when set, else a temporary folder).
#   2. Makes sure the Python requirements import. The preinstalled torch is never touched: a pip install pins it
#      with a constraint (torch==<installed version>). On a machine without a package index, put wheels in .whl/
#      first (pure-Python ones suffice for a CUDA image that has torch/transformers/accelerate; the H200 image of
#      2026-12 has peft but lacks diffusers, toml and importlib_metadata), e.g. here:
#        echo /.whl/ >> .git/info/exclude
#        python -m pip download --no-deps -d .whl diffusers==0.42.1 toml==0.10.2 importlib_metadata
#      and they are installed with --no-index --no-deps into /tmp/apt-lora-site.
#   3. Correctness first: `python -m bench.prior_graph_check --configs $CONFIGS --variants $GRAPH_VARIANTS >
#      $OUT/prior_graph_check-gpu.md`: APT steps with the prior pass (--apt_cuda_graph), the fine-tuned forward+backward
#      (--unet_cuda_graph) and both replayed as CUDA graphs against the eager steps (loss, APT terms, LoRA gradients
#      and weights, γ), and a second eager run for the noise floor. SKIP_GRAPH_CHECK=1 skips it.
#   3a. The trainer on the device (SKIP_SMOKE=1 skips it): the bundled toy model, --apt --cuda_graphs auto, 30 steps
#      in bf16, from cached latents, from images (2 loader workers), from images in batches of 2 (a short batch
#      each epoch: a shape recorded mid-run beside the loader's threads), and from cached latents with --full_bf16;
#      logs smoke_*.log in $LOGS.
#   3b. Host-device syncs per optimizer step: `python -m bench.sync_check --configs $CONFIGS > $OUT/sync_check-gpu.md`
#      (CUDA's sync debug mode; expected 0 per step, 1 with --defer_step_read off). SKIP_SYNC_CHECK=1 skips it.
#   3c. Only with RUN_COMPILE=1: `bench.inductor_grad_check --device cuda` (the input gradient that CPU inductor
#      gets wrong; seconds) into $OUT/inductor_grad_check-gpu.md; --torch_compile's blocks (inductor) against eager
#      APT steps (`bench.prior_graph_check --variants compiled` on $COMPILE_CONFIGS, default sd15) and its warm-up,
#      graphs and step time against eager (`bench.compile_time --real --archs $COMPILE_ARCHS`, default sd1), into
#      $OUT/compile_check-gpu.md and $OUT/compile_time-gpu.md. Not timed on a GPU yet: budget several minutes.
#   3d. Only with RUN_OVERLAP=1: `python -m bench.stream_overlap --configs $CONFIGS > $OUT/stream_overlap-gpu.md`:
#      how much of an extra prior pass hides behind the fast APT step on a second CUDA stream (about 2 minutes).
#   3e. Only with RUN_FP8=1: `bench.step_time --grad_ckpt off` on $CONFIGS twice, bf16 base weights and
#      --fp8_base, into $OUT/fp8_step_time-bf16-gpu.md and $OUT/fp8_step_time-fp8-gpu.md (docs/speed.md, step 6).
#   4. Runs `python -m bench.step_time --configs sd15,sdxl --out $OUT/step_time-gpu.md`, each config and
#      gradient-checkpointing setting in its own process with a timeout (STEP_TIMEOUT seconds, default 240).
#      SKIP_STEP_TIME=1 skips it.
#   5. Runs `python -m bench.apt_overhead --configs $CONFIGS --batch_sizes $BATCH_SIZES --grad_ckpt $APT_GRAD_CKPT
#      --out $OUT/apt_overhead-gpu.md`: per config and batch size the reference step (bench/reference_step.py, a copy
#      of ../shared/bench/reference_step.py; needs peft), this project's plain step and its APT step, plus
#      "plain (fast)" and "APT (fast)" columns with `$APT_EXTRA` and `--apt $APT_EXTRA` when APT_EXTRA is set (e.g.
#      APT_EXTRA="--apt_cuda_graph --unet_cuda_graph"), each in its own process; APT_UNET_ONLY=1 adds --unet_only
#      (LoRA on the UNet only, text-encoder outputs cached: the reference's setting, and that of
#      bench/results/apt_overhead-h200.md). SKIP_APT=1 skips it.
#   Durations measured on an H200 (2026-12-04, machine start ~1 minute on top): the graph check of sd15,sdxl with
#   three graph variants 100 s (add ~25 s for the eager row); apt_overhead with the fast columns at batch 1 and 5
#   steps: SDXL 229 s (reference 74 s, each project column 33-38 s), SD1.5 155 s. So in the 15 minutes a session
#   gets on a GPU, one call of ~9 minutes:
#      APT_EXTRA="--apt_cuda_graph --unet_cuda_graph" APT_UNET_ONLY=1 SKIP_STEP_TIME=1 BATCH_SIZES=1 STEPS=5 \
#        bash bench/gpu_check.sh
#   or the check alone (~2.5 minutes): SKIP_STEP_TIME=1 SKIP_APT=1 bash bench/gpu_check.sh
#
# Environment: OUT (output folder), STEPS (timed steps, default 10), WARMUP (default 3), STEP_TIMEOUT, GRAPH_TIMEOUT
# (the graph check's, default 420 s),
# CONFIGS (default sd15,sdxl), BATCH_SIZES (apt_overhead's, default 1,4), APT_GRAD_CKPT (apt_overhead's gradient
# checkpointing settings, default off: the setting the issue's targets and reference figures are for; off,on for
# both), APT_EXTRA (default empty), APT_UNET_ONLY (default 0), GRAPH_VARIANTS (prior_graph_check's, default eager,prior,unet,both), SKIP_STEP_TIME, SKIP_APT, SKIP_GRAPH_CHECK, SKIP_SMOKE, SKIP_SYNC_CHECK, RUN_OVERLAP, RUN_COMPILE, RUN_FP8, COMPILE_CONFIGS, COMPILE_ARCHS, PYTHON (default python3, else python).
# Exit code: 0 when every config produced a row, 1 when one failed or timed out (the table still says which).
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.." || exit 2
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
if [ -n "${OUT:-}" ]; then
  LOGS="$OUT"                                   # e.g. the device machine's $OUT: everything comes back
elif [ "$DRY_RUN" = 1 ]; then
  OUT="$(mktemp -d)"; LOGS="$OUT"               # a dry run leaves nothing in the repository
else
  OUT=bench/results; LOGS="$(mktemp -d)"        # the table where the results live, the logs aside
fi
STEPS="${STEPS:-10}"
WARMUP="${WARMUP:-3}"
STEP_TIMEOUT="${STEP_TIMEOUT:-240}"
GRAPH_TIMEOUT="${GRAPH_TIMEOUT:-420}"  # the graph check of sd15,sdxl with three variants took 100 s on an H200
CONFIGS="${CONFIGS:-sd15,sdxl}"
BATCH_SIZES="${BATCH_SIZES:-1,4}"
APT_GRAD_CKPT="${APT_GRAD_CKPT:-off}"
APT_EXTRA="${APT_EXTRA:-}"
GRAPH_VARIANTS="${GRAPH_VARIANTS:-eager,prior,unet,both}"
RESULT="$OUT/step_time-gpu.md"
APT_RESULT="$OUT/apt_overhead-gpu.md"
EXTRA=()
if [ "$DRY_RUN" = 1 ]; then
  CONFIGS="tiny-sd1,tiny-sdxl"; STEPS=1; WARMUP=1; BATCH_SIZES=1,2
  RESULT="$OUT/step_time-dryrun.md"
  APT_RESULT="$OUT/apt_overhead-dryrun.md"
  EXTRA=(--threads 1)
fi
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1

# 1. the machine
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "python: $PYTHON ($("$PYTHON" --version 2>&1))"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1
} | tee "$LOGS/env.txt"

# 2. the requirements, without touching torch
need_check() {
  "$PYTHON" - <<'EOF'
import importlib, sys
missing = []
for name in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "toml", "tqdm", "PIL", "numpy"):
    try:
        importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken install
        missing.append(f"{name} ({type(e).__name__}: {e})")
print("\n".join(missing))
sys.exit(1 if missing else 0)
EOF
}
if ! missing="$(need_check)"; then
  echo "missing Python packages: $missing"
  TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    echo "installing the wheels in .whl/ (no index, no dependencies) into /tmp/apt-lora-site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/apt-lora-site .whl/*.whl
    export PYTHONPATH="/tmp/apt-lora-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    CONSTRAINT="$(mktemp)"
    [ -n "$TORCH_VERSION" ] && echo "torch==$TORCH_VERSION" > "$CONSTRAINT"
    echo "pip install -r requirements.txt (torch pinned to the installed ${TORCH_VERSION:-none})"
    "$PYTHON" -m pip install -q --retries 1 --timeout 20 -r requirements.txt -c "$CONSTRAINT"
    rm -f "$CONSTRAINT"
  fi
  if ! missing="$(need_check)"; then
    echo "still missing after the install: $missing" | tee -a "$LOGS/env.txt"
    exit 2
  fi
fi
if ! "$PYTHON" -c "import peft" >/dev/null 2>&1; then  # only the reference step needs it: its column shows the error
  echo "peft does not import: apt_overhead's reference column will show an error (pip install peft)" | tee -a "$LOGS/env.txt"
fi
"$PYTHON" -c "import diffusers, transformers, accelerate; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$LOGS/env.txt"

# 3. the benchmark
if [ "$DRY_RUN" = 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: run with --dry-run to check the flow on CPU" | tee -a "$LOGS/env.txt"
  exit 2
fi
status=0
# 3. correctness first: the graphed paths (--apt_cuda_graph, --unet_cuda_graph) train like the eager ones (tiny
#    configs on the CPU in a dry run); if they do not, the fast columns below measure a wrong step
if [ "${SKIP_GRAPH_CHECK:-0}" = 0 ]; then
  GRAPH_RESULT="$OUT/prior_graph_check-$([ "$DRY_RUN" = 1 ] && echo dryrun || echo gpu).md"
  echo "python -m bench.prior_graph_check --configs $CONFIGS --variants $GRAPH_VARIANTS > $GRAPH_RESULT"
  timeout "$GRAPH_TIMEOUT" "$PYTHON" -m bench.prior_graph_check --configs "$CONFIGS" --variants "$GRAPH_VARIANTS" \
    > "$GRAPH_RESULT" 2> >(tee "$LOGS/prior_graph_check.log" >&2)
  graph_status=$?
  cat "$GRAPH_RESULT"
  [ "$graph_status" != 0 ] && status=$graph_status
fi
# 3a. the trainer itself on the device: the bundled toy model with APT and --cuda_graphs auto, from cached latents
#     and from images (pixel-space augmentation, pinned batches, loader workers): CUDA-only paths end to end
if [ "${SKIP_SMOKE:-0}" = 0 ]; then
  SMOKE_STEPS=$([ "$DRY_RUN" = 1 ] && echo 2 || echo 30)
  SMOKE=(--pretrained_model_name_or_path examples/models/toyworld-sd1 --dataset_config examples/toyworld/dataset.toml
         --apt --network_dim 8 --network_train_unet_only --learning_rate 1e-3 --max_train_steps "$SMOKE_STEPS" --seed 42
         --cuda_graphs auto --overwrite)
  [ "$DRY_RUN" = 0 ] && SMOKE+=(--mixed_precision bf16)
  SMOKE_DIR="$(mktemp -d)"  # the LoRAs stay out of $OUT: only the logs come back
  # batches of 2 of 21 x 5 images: an epoch of 52 batches of 2 and one of 1 at a shuffled place, a shape recorded
  # mid-epoch while the loader's workers and pin-memory thread fill the next batches (the recordings' thread_local
  # capture mode); 60 steps reach it wherever it is
  sed 's/^batch_size = 1/batch_size = 2/; s/num_repeats = 1$/num_repeats = 21/' examples/toyworld/dataset.toml \
    > "$SMOKE_DIR/batch2.toml"
  for mode in latents images shapes full_bf16; do
    MODE_ARGS=(--output_dir "$SMOKE_DIR/$mode" --output_name smoke)
    case "$mode" in
      latents) MODE_ARGS+=(--cache_latents) ;;
      images) MODE_ARGS+=(--max_data_loader_n_workers 2) ;;
      shapes) MODE_ARGS+=(--max_data_loader_n_workers 2 --persistent_data_loader_workers
                          --dataset_config "$SMOKE_DIR/batch2.toml")
              [ "$DRY_RUN" = 0 ] && MODE_ARGS+=(--max_train_steps 60) ;;
      full_bf16) MODE_ARGS+=(--cache_latents --full_bf16)  # bf16 LoRA weights and optimizer states
                 [ "$DRY_RUN" = 1 ] && MODE_ARGS+=(--mixed_precision bf16) ;;
    esac
    echo "python train_apt_lora.py ${SMOKE[*]} ${MODE_ARGS[*]}"
    timeout "$STEP_TIMEOUT" "$PYTHON" train_apt_lora.py "${SMOKE[@]}" "${MODE_ARGS[@]}" > "$LOGS/smoke_$mode.log" 2>&1
    smoke_status=$?
    tr '\r' '\n' < "$LOGS/smoke_$mode.log" | grep -E "cuda_graphs|steps: 100%|saved|Error|error" | tail -6
    echo "trainer smoke ($mode): exit code $smoke_status" | tee -a "$LOGS/env.txt"
    [ "$smoke_status" != 0 ] && status=$smoke_status
  done
fi
# 3b. host-device syncs per optimizer step of the plain, APT and fast APT steps (expected: 0 with --defer_step_read,
#     1 with it off, the window's read)
if [ "${SKIP_SYNC_CHECK:-0}" = 0 ]; then
  SYNC_RESULT="$OUT/sync_check-$([ "$DRY_RUN" = 1 ] && echo dryrun || echo gpu).md"
  echo "python -m bench.sync_check --configs $CONFIGS --steps 3 --warmup 2 > $SYNC_RESULT"
  timeout "$STEP_TIMEOUT" "$PYTHON" -m bench.sync_check --configs "$CONFIGS" --steps 3 --warmup 2 > "$SYNC_RESULT" \
    2> >(tee "$LOGS/sync_check.log" >&2)
  sync_status=$?
  cat "$SYNC_RESULT"
  [ "$sync_status" != 0 ] && status=$sync_status
fi
# 3d. only with RUN_OVERLAP=1: how much of a prior pass hides behind a fast APT step on a second stream (the
#     question before pipelining the prior pass; bench/stream_overlap.py)
if [ "${RUN_OVERLAP:-0}" = 1 ]; then
  OVERLAP_CONFIGS=$([ "$DRY_RUN" = 1 ] && echo tiny-sd1 || echo "$CONFIGS")
  OVERLAP_RESULT="$OUT/stream_overlap-$([ "$DRY_RUN" = 1 ] && echo dryrun || echo gpu).md"
  echo "python -m bench.stream_overlap --configs $OVERLAP_CONFIGS > $OVERLAP_RESULT"
  timeout "$STEP_TIMEOUT" "$PYTHON" -m bench.stream_overlap --configs "$OVERLAP_CONFIGS" > "$OVERLAP_RESULT" \
    2> >(tee "$LOGS/stream_overlap.log" >&2)
  overlap_status=$?
  cat "$OVERLAP_RESULT"
  [ "$overlap_status" != 0 ] && status=$overlap_status
fi
# 3c. --torch_compile (opt-in: inductor's first compile of a full-size UNet takes minutes): the compiled blocks
#     against eager APT steps over two bucket shapes, then graphs, warm-up and step time against eager
if [ "${RUN_COMPILE:-0}" = 1 ]; then
  if [ "$DRY_RUN" = 0 ]; then  # seconds: inductor's input gradient through a LoRA'd block (wrong on the CPU)
    echo "python -m bench.inductor_grad_check --device cuda > $OUT/inductor_grad_check-gpu.md"
    "$PYTHON" -m bench.inductor_grad_check --device cuda > "$OUT/inductor_grad_check-gpu.md" \
      2> >(tee "$LOGS/inductor_grad_check.log" >&2)
    compile_status=$?
    cat "$OUT/inductor_grad_check-gpu.md"
    [ "$compile_status" != 0 ] && status=$compile_status
  fi
  if [ "$DRY_RUN" = 1 ]; then
    CHECK_CONFIGS=tiny-sd1; CT_ARGS=(--archs sd1 --backends aot_eager --steps apt --timed_steps 2); SUFFIX=dryrun
  else
    CHECK_CONFIGS="${COMPILE_CONFIGS:-sd15}"; CT_ARGS=(--archs "${COMPILE_ARCHS:-sd1}" --backends inductor --real); SUFFIX=gpu
  fi
  echo "python -m bench.prior_graph_check --configs $CHECK_CONFIGS --variants compiled > $OUT/compile_check-$SUFFIX.md"
  timeout 600 "$PYTHON" -m bench.prior_graph_check --configs "$CHECK_CONFIGS" --variants compiled \
    > "$OUT/compile_check-$SUFFIX.md" 2> >(tee "$LOGS/compile_check.log" >&2)
  compile_status=$?
  cat "$OUT/compile_check-$SUFFIX.md"
  [ "$compile_status" != 0 ] && status=$compile_status
  echo "python -m bench.compile_time ${CT_ARGS[*]} --out $OUT/compile_time-$SUFFIX.md"
  "$PYTHON" -m bench.compile_time "${CT_ARGS[@]}" --timeout 900 --out "$OUT/compile_time-$SUFFIX.md" \
    2> >(tee "$LOGS/compile_time.log" >&2)
  compile_status=$?
  [ "$compile_status" != 0 ] && status=$compile_status
fi
# 3e. only with RUN_FP8=1: --fp8_base's memory and time against bf16 base weights, one table each, same card
if [ "${RUN_FP8:-0}" = 1 ]; then
  FP8_CONFIGS=$([ "$DRY_RUN" = 1 ] && echo tiny-sd1 || echo "$CONFIGS")
  FP8_DTYPE=()
  [ "$DRY_RUN" = 1 ] && FP8_DTYPE=(--dtype bf16)  # the tiny configs run in fp32, where fp8 has no compute dtype
  for variant in bf16 fp8; do
    FP8_FLAGS=$([ "$variant" = fp8 ] && echo "--fp8_base" || echo "")
    FP8_RESULT="$OUT/fp8_step_time-$variant-$([ "$DRY_RUN" = 1 ] && echo dryrun || echo gpu).md"
    echo "python -m bench.step_time --configs $FP8_CONFIGS --grad_ckpt off --train_args=\"$FP8_FLAGS\" --out $FP8_RESULT"
    "$PYTHON" -m bench.step_time --configs "$FP8_CONFIGS" --grad_ckpt off --steps "$STEPS" --warmup "$WARMUP" \
      --timeout "$STEP_TIMEOUT" ${EXTRA[@]+"${EXTRA[@]}"} ${FP8_DTYPE[@]+"${FP8_DTYPE[@]}"} \
      --train_args="$FP8_FLAGS" --out "$FP8_RESULT" 2> >(tee "$LOGS/fp8_step_time-$variant.log" >&2)
    fp8_status=$?
    [ "$fp8_status" != 0 ] && status=$fp8_status
  done
fi
# 4. the step time with and without gradient checkpointing
if [ "${SKIP_STEP_TIME:-0}" = 0 ]; then
  echo "python -m bench.step_time --configs $CONFIGS --steps $STEPS --warmup $WARMUP --timeout $STEP_TIMEOUT ${EXTRA[*]:-} --out $RESULT"
  "$PYTHON" -m bench.step_time --configs "$CONFIGS" --steps "$STEPS" --warmup "$WARMUP" --timeout "$STEP_TIMEOUT" \
    ${EXTRA[@]+"${EXTRA[@]}"} --out "$RESULT" 2> >(tee "$LOGS/step_time.log" >&2)
  step_status=$?
  echo "exit code $step_status; table in $RESULT, logs in $LOGS"
  [ "$step_status" != 0 ] && status=$step_status
fi
# 5. the reference, plain and APT steps side by side on the same card, unless only the step time was asked for
if [ "${SKIP_APT:-0}" = 0 ]; then
  APT_ARGS=(--configs "$CONFIGS" --batch_sizes "$BATCH_SIZES" --grad_ckpt "$APT_GRAD_CKPT" --steps "$STEPS"
            --warmup "$WARMUP" --timeout "$STEP_TIMEOUT" ${EXTRA[@]+"${EXTRA[@]}"})
  [ -n "$APT_EXTRA" ] && APT_ARGS+=(--extra_apt_args="$APT_EXTRA")
  [ "${APT_UNET_ONLY:-0}" = 1 ] && APT_ARGS+=(--unet_only)
  echo "python -m bench.apt_overhead ${APT_ARGS[*]} --out $APT_RESULT"
  "$PYTHON" -m bench.apt_overhead "${APT_ARGS[@]}" --out "$APT_RESULT" 2> >(tee "$LOGS/apt_overhead.log" >&2)
  apt_status=$?
  echo "exit code $apt_status; table in $APT_RESULT, logs in $LOGS"
  [ "$apt_status" != 0 ] && status=$apt_status
fi
exit $status
