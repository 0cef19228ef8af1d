#!/bin/bash
# One prepared GPU run of benchmarks/vs_trainer.py on a machine that cannot install packages.
# benchmarks/gpu_prepare.py packs .gpu/ (model as fp16, widened back to fp32 here; the packaged data as
# parquet; wheels the machine lacks for Python 3.10-3.13, the matching ones installed to /tmp/site). Run from
# the repository root: bash benchmarks/gpu_run.sh
# vs_trainer.py detects the GPU case itself and runs its systems (B1 fp32, B1-bf16 where the GPU has bf16, B2,
# tunelab with measured precision, tunelab-compiled for full and lora), printing each target met or not.
# Size, by reading (not yet timed): 30 steps a run, 18 runs of 12-20 s each with loading and evaluation, about
# 2 minutes of compiling, 4 benchmark start-ups: 9-11 minutes, at the 10-minute limit of one device command.
# Each method's JSON is copied to OUT as soon as it ends, so a command stopped at its limit keeps the methods
# done; METHODS="full lora" (the two with a compiled run) halves it.
# Environment: METHODS (default: all four, one benchmark each, full and lora first), BENCH_ARGS (e.g.
# "--steps 125"), OUT (where logs and JSON go), FORK_CHECK=1 (afterwards, whether runs forked from tunelab's
# fork server can use CUDA), SKIP_WHEELS=1 and PY=... to try it on the CPU here.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUTDIR=${OUT:-/tmp/out}; mkdir -p "$OUTDIR"
PY=${PY:-python3}
if [ -z "${SKIP_WHEELS:-}" ]; then
  # pip picks the wheel of this interpreter's version among those packed
  $PY -m pip install -q --no-index --find-links .gpu/whl --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 || exit 3
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
MODEL=${MODEL_DIR:-/tmp/model}
mkdir -p $MODEL && cp .gpu/model/*.json .gpu/model/vocab.txt $MODEL/
$PY - <<PYEOF
import torch
from safetensors.torch import load_file, save_file
w = load_file(".gpu/model/model.fp16.safetensors")
save_file({k: v.float() for k, v in w.items()}, "$MODEL/model.safetensors", metadata={"format": "pt"})
import transformers, peft, accelerate, datasets, pyarrow
print("versions: torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "peft", peft.__version__, "accelerate", accelerate.__version__, "datasets", datasets.__version__,
      "pyarrow", pyarrow.__version__, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PYEOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
COMMON="--override model.name_or_path=$MODEL --override data.train_file=.gpu/train.parquet \
 --override data.test_file=.gpu/test.parquet --override data.text_column=review --override data.label_column=score"
$PY -c "import scipy, matplotlib, tensorboard" 2>/dev/null || echo "note: scipy, matplotlib or tensorboard \
missing: the benchmark runs, FORK_CHECK's compare would fail"
for m in ${METHODS:-full lora llrd prompt-tuning}; do
  $PY benchmarks/vs_trainer.py --methods $m ${BENCH_ARGS:-} $COMMON 2>&1 | grep -v -i warn | tee -a "$OUTDIR/log.txt"
  cp benchmarks/results/vs_trainer-*.json "$OUTDIR/" 2>/dev/null
done
[ "${FORK_CHECK:-0}" = 1 ] || exit 0
# Can runs forked from tunelab's fork server use CUDA? By default a machine with a GPU starts fresh interpreters
# (src/tunelab/experiment/forkserver.py); this forces the server on for one small comparison and says whether
# every run succeeded, which would allow turning it on there.
TUNELAB_FORK_SERVER=1 $PY -m tunelab.cli compare --output "$OUTDIR/forked" --overwrite --no-progress \
  model.name_or_path=$MODEL data.train_file=.gpu/train.parquet data.test_file=.gpu/test.parquet \
  data.text_column=review data.label_column=score data.max_train_samples=256 train.max_steps=20 \
  "methods=[lora,full]" > "$OUTDIR/forked.log" 2>&1
$PY -c "import json; r = json.load(open('$OUTDIR/forked/results.json'))['methods']; print('fork server on CUDA:', [(x['method'], x['status'], x.get('startup_s'), x.get('error')) for x in r])" \
  | tee -a "$OUTDIR/log.txt" || tail -20 "$OUTDIR/forked.log"
