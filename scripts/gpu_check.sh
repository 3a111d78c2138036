#!/usr/bin/env bash
# GPU check for lorafit's distributed/QLoRA paths (issue 6). Run on a machine with CUDA:
#   scripts/gpu_check.sh            # set up .venv if needed, then run the checks
# Env: LORAFIT_TORCH   torch requirement for scripts/setup.sh (default: a CUDA build of torch 2.13.0
#                      from PIP_EXTRA_INDEX_URL, default https://download.pytorch.org/whl/cu128)
#      GPU_CHECK_PYTHON use this Python (with lorafit installed) instead of ./.venv; no setup
#      GPU_CHECK_STEPS  training steps per run (default 60)
#      GPU_CHECK_OUT    work folder (default: a new temporary folder)
# Runs: QLoRA on one GPU (tiny BERT classifier, tiny Llama SFT); with more than one GPU also
# DDP QLoRA on every GPU (configs/accelerate/multi_gpu.yaml), FSDP LoRA (fsdp.yaml) and, when
# deepspeed imports, ZeRO-2 and ZeRO-3 LoRA. Prints one table row per run: device, bitsandbytes
# version, steps/s, peak CUDA memory, test metric, DDP world size, and whether the saved adapter
# is complete (every tensor non-empty, lora_A/lora_B present). Exit 1 on a machine without CUDA
# or when any run fails.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU on this machine (nvidia-smi missing or sees no GPU); nothing to check" >&2
    exit 1
fi
NGPU=$(nvidia-smi -L | grep -c '^GPU ')

if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    PY=$GPU_CHECK_PYTHON
else
    PY=.venv/bin/python
    if ! { [ -x "$PY" ] && "$PY" -c 'import torch, lorafit.metrics; assert torch.cuda.is_available()' 2>/dev/null; }; then
        echo "gpu_check: setting up .venv with a CUDA torch (scripts/setup.sh)"
        export PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL:-https://download.pytorch.org/whl/cu128}
        LORAFIT_TORCH=${LORAFIT_TORCH:-torch==2.13.0} bash scripts/setup.sh || {
            echo "gpu_check: setup failed (set LORAFIT_TORCH to a CUDA torch build, or GPU_CHECK_PYTHON)" >&2
            exit 1
        }
    fi
fi
if ! "$PY" -c 'import torch; assert torch.cuda.is_available(), "torch.cuda.is_available() is False"; print("torch", torch.__version__, "CUDA", torch.version.cuda)'; then
    echo "gpu_check: this torch cannot use the GPU; set LORAFIT_TORCH to a CUDA build" >&2
    exit 1
fi
BIN=$(dirname "$PY")
if [ -x "$BIN/accelerate" ]; then ACCELERATE="$BIN/accelerate launch"; else ACCELERATE="$PY -m accelerate.commands.launch"; fi
STEPS=${GPU_CHECK_STEPS:-60}
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t lorafit-gpu-check-XXXX)}
mkdir -p "$OUT"
echo "gpu_check: $NGPU GPU(s); work folder $OUT"

# tiny models + data (no download)
PYTHONPATH=. "$PY" - "$OUT" <<'PYEOF' || { echo "gpu_check: could not build the tiny models" >&2; exit 1; }
import json, sys
from pathlib import Path
from tests.tiny import tiny_bert, tiny_llama
from tests.test_trainer import sentiment_rows
out = Path(sys.argv[1])
tiny_bert(out / "bert"); tiny_llama(out / "llama")
(out / "sst").mkdir(exist_ok=True)
for split, n, seed in (("train", 400, 0), ("test", 200, 1)):
    (out / "sst" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n, seed)))
recs = [{"instruction": f"say the word number {i}", "input": "", "output": f"word {i % 5} done"} for i in range(200)]
(out / "sft.json").write_text(json.dumps(recs))
PYEOF

CLS="model.name_or_path=$OUT/bert model.max_length=32 data.path=$OUT/sst data.k_shot=32 method.r=8 train.steps=$STEPS train.batch_size=8 train.lr=2e-3 train.eval_every=20 eval.batch_size=64 eval.bootstrap_samples=100 output.report_to=[]"
SFT="model.name_or_path=$OUT/llama model.max_length=48 data.path=$OUT/sft.json data.train_size=100 method.r=8 train.steps=$STEPS train.batch_size=8 train.lr=2e-3 train.eval_every=20 eval.batch_size=32 eval.bootstrap_samples=100 output.report_to=[]"
FAILED=0
ROWS="$OUT/rows.txt"; : > "$ROWS"

run() {  # name, launcher words..., -- overrides...
    local name=$1; shift
    local launcher=()
    while [ "$1" != "--" ]; do launcher+=("$1"); shift; done; shift
    echo "gpu_check: [$name] ${launcher[*]} ... $*"
    if timeout 900 "${launcher[@]}" -m lorafit train "$@" "output.dir=$OUT/$name" > "$OUT/$name.log" 2>&1; then
        echo "$name" >> "$ROWS"
    else
        echo "gpu_check: [$name] FAILED, last lines of $OUT/$name.log:" >&2
        tail -n 25 "$OUT/$name.log" >&2
        echo "$name FAILED" >> "$ROWS"; FAILED=1
    fi
}

run qlora_cls_1gpu env CUDA_VISIBLE_DEVICES=0 "$PY" -- $CLS method.name=qlora
run qlora_sft_1gpu env CUDA_VISIBLE_DEVICES=0 "$PY" -- $SFT method.name=qlora
if [ "$NGPU" -gt 1 ]; then
    MG="--config_file configs/accelerate/multi_gpu.yaml --num_processes $NGPU --mixed_precision no"
    run qlora_cls_ddp $ACCELERATE $MG -- $CLS method.name=qlora
    run lora_sft_ddp $ACCELERATE $MG -- $SFT method.name=lora
    run full_cls_ddp $ACCELERATE $MG -- $CLS method.name=full
    run lora_cls_fsdp $ACCELERATE --config_file configs/accelerate/fsdp.yaml --num_processes "$NGPU" -- $CLS method.name=lora
    if "$PY" -c 'import deepspeed' 2>/dev/null; then
        for z in 2 3; do
            run "lora_cls_zero$z" $ACCELERATE --config_file "configs/accelerate/deepspeed_zero$z.yaml" --num_processes "$NGPU" -- $CLS method.name=lora
            run "lora_sft_zero$z" $ACCELERATE --config_file "configs/accelerate/deepspeed_zero$z.yaml" --num_processes "$NGPU" -- $SFT method.name=lora
        done
    else
        echo "gpu_check: deepspeed is not installed; ZeRO-2/3 runs skipped (pip install deepspeed)"
    fi
else
    echo "gpu_check: one GPU; multi-GPU (DDP/FSDP/DeepSpeed) runs skipped"
fi

"$PY" - "$OUT" "$ROWS" <<'PYEOF'
import importlib.metadata as md, json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
out, rows = Path(sys.argv[1]), Path(sys.argv[2]).read_text().split("\n")
try:
    bnb = md.version("bitsandbytes")
except md.PackageNotFoundError:
    bnb = "missing"
dev = torch.cuda.get_device_name(0)
head = f"{'run':<16} {'device':<26} {'bnb':<8} {'steps/s':>8} {'peak MB':>9} {'test metric':>18} {'world':>5}  adapter"
print("\n" + head + "\n" + "-" * len(head))
for line in filter(None, rows):
    name, *failed = line.split()
    if failed:
        print(f"{name:<16} {dev[:26]:<26} {bnb:<8} {'FAILED':>8}")
        continue
    s = json.loads((out / name / "summary.json").read_text())
    t = s["test"]
    metric = f"acc {t['accuracy']:.3f}" if "accuracy" in t else f"loss {t['loss']:.3f}"
    sps = s["stopped_at_step"] / max(s["wall_time_s"], 1e-9)
    adapter = out / name / "adapter"
    status = "n/a"
    if (adapter / "adapter_model.safetensors").is_file():
        w = load_file(str(adapter / "adapter_model.safetensors"))
        ok = w and all(v.numel() > 0 for v in w.values()) and any("lora_B" in k for k in w)
        status = "complete" if ok else "EMPTY/INCOMPLETE"
    elif (adapter / "model.safetensors").is_file() or list(adapter.glob("model-*.safetensors")):
        status = "full weights"
    peak = s.get("peak_cuda_memory_mb") or 0
    print(f"{name:<16} {dev[:26]:<26} {bnb:<8} {sps:>8.2f} {peak:>9.0f} {metric:>18} {s['num_processes']:>5}  {status}")
PYEOF
exit $FAILED
