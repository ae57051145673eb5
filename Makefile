# Two commands set everything up: `make demo` (train + evaluate on DigitScenes) and `make test`.
# Each re-run reuses the virtualenv, the Detectron2 build and the generated data.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install only when the requirements, the pins or the installer change.
STAMP := $(VENV)/.region_contrast-installed
DEMO_CONFIG ?= configs/DigitScenes/deeplab_v3_plus_R_18_os32_region_contrast_noproj_digit_scenes_1500_bs8.yaml
PYTEST_ARGS ?=

.PHONY: install data demo test bench results clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt tools/install_detectron2.py | $(PY)
	$(PY) -m pip install --disable-pip-version-check -c constraints.txt -e ".[test]"
	$(PY) tools/install_detectron2.py
	touch $@

install: $(STAMP)

data: install
	$(PY) datasets/prepare_digit_scenes.py

demo: data
	$(PY) train_net.py --config-file $(DEMO_CONFIG)

# The lint first (.flake8: Detectron2's settings), then the suite. pytest exits 5 when a
# selection (PYTEST_ARGS="-k ...") collects nothing: say so, not fail.
test: install
	$(PY) -m flake8
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "warning: pytest collected no tests" >&2; exit 0; fi; exit $$rc

# Cost benchmark on the CPU (RC vs baseline train step, inference, contrast machinery, bank
# memory): prints a table, writes results/benchmark.json. GPU: $(PY) tools/benchmark.py --device cuda
bench: install
	$(PY) tools/benchmark.py

# The DigitScenes study (tools/run_experiments.py): 15 settings screened on val, then the one or two
# that gain most over their regime's baseline confirmed against it on test with 3 seeds; 2.5-4
# hours on 2 cores, resumable (the run records in results/digit_scenes_study/ are kept):
# results/digit_scenes_study.{md,png}.
results: data
	$(PY) tools/run_experiments.py

clean-venv:
	rm -rf $(VENV)
