#!/usr/bin/env bash
# The GPU check of the speed work, as one command (a few minutes on one H100/H200):
#   - installs the packages the GPU machine lacks, or has in other versions, from wheels in .whl/ (no internet);
#   - checks that the bf16 loss is finite and within 1% of the fp32 loss on a short sample, at full size;
#   - checks that --use_liger_kernel gives the plain model's loss and gradients (tests/models/test_liger.py);
#   - times LoRA and frozen-vision training of the real 4.15B architecture (random weights) in bf16 at
#     num_crops 16, with SDPA, with SDPA and Liger's kernels, and, when flash-attn is installed, with flash
#     attention; prints the tables with images/s, tokens/s, padding, peak GPU memory and model FLOP utilisation.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # here, where pip reaches the registry: wheels into .whl/
#   bash benchmarks/gpu_check.sh                  # there (carry .whl): install, check, time
#   bash benchmarks/gpu_check.sh --dry-run        # on a CPU, at --size tiny with few steps: checks this script
set -euo pipefail
cd "$(dirname "$0")/.."

# What train_throughput.py imports and the GPU machine's image lacks or has at other versions (pinned as in
# requirements.txt; the image has torch, accelerate, numpy, pandas, pyarrow, matplotlib and the rest).
WHEELS=(
    transformers==5.24.0 peft==0.21.2 tokenizers==0.23.3 huggingface-hub==2.4.0 hf-xet==1.8.0
    httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    fsspec==2026.9.0 liger-kernel==0.8.5 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0
)

case "${1:-}" in
    --fetch-wheels)
        exclude=$(git rev-parse --git-path info/exclude)  # keeps the wheels out of git, in any checkout
        mkdir -p "$(dirname "$exclude")"
        grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
        platforms=()
        for n in 17 24 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
        du -sh .whl
        exit 0
        ;;
    --dry-run)
        PYTHON=.venv/bin/python
        echo "Wheels the GPU run would carry (--fetch-wheels): ${WHEELS[*]}"
        # the carried pins must be what this checkout installs, or the GPU would time other versions
        "$PYTHON" - "${WHEELS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
stale = []
for pin in sys.argv[1:]:
    name, wanted = pin.split("==")
    try:
        installed = version(name)
    except PackageNotFoundError:
        installed = "not installed"
    if installed != wanted:
        stale.append(f"{pin} (here: {installed})")
if stale:
    sys.exit("gpu_check.sh WHEELS differ from this checkout's packages: " + ", ".join(stale))
print(f"all {len(sys.argv) - 1} pins match the packages installed here")
EOF
        RUN=(--size tiny --batch_size 2 --batch_size_per_gpu 2 --steps 1 --warmup_steps 0 --num_crops 4)
        ;;
    "")
        PYTHON=python3
        if compgen -G ".whl/*.whl" > /dev/null; then
            "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
                || { echo "the wheels in .whl/ are for Python 3.12 (--fetch-wheels): fetch them for this one" >&2; exit 1; }
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                .whl/*.whl
            export PYTHONPATH=/tmp/site
        fi
        RUN=(--size full --bf16 --batch_size 16 --batch_size_per_gpu 4 --steps 3 --warmup_steps 1 --num_crops 16)
        ;;
    *)
        echo "usage: bash benchmarks/gpu_check.sh [--fetch-wheels | --dry-run]" >&2
        exit 2
        ;;
esac

"$PYTHON" - <<'EOF'
import platform, sys
sys.path.insert(0, ".")
import phi3v  # first: it quiets the messages every machine without a GPU prints
import peft, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}; {gpu}")
EOF

echo "== SDPA =="
"$PYTHON" benchmarks/train_throughput.py "${RUN[@]}" --mode lora,frozen_vision --precision_check
if [ "$PYTHON" = python3 ]; then
    echo "== Liger kernels: same loss and gradients as without =="
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/models/test_liger.py
    echo "== SDPA + Liger kernels =="
    "$PYTHON" benchmarks/train_throughput.py "${RUN[@]}" --mode lora,frozen_vision --use_liger_kernel
else
    echo "== Liger kernels: GPU only; skipped in the dry run =="
fi
if "$PYTHON" -c "import flash_attn" 2> /dev/null; then
    echo "== flash attention (bf16 weights) =="
    "$PYTHON" benchmarks/train_throughput.py "${RUN[@]}" --mode lora,frozen_vision --use_flash_attention
else
    echo "== flash attention: flash-attn is not installed here; skipped =="
fi
