# `make demo` and `make test` set everything up on a fresh machine; the virtual environment is .venv.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(PYTHON) -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info

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
