# One venv, made with pip under the exact pins of constraints.txt (the torch wheels lie on this machine's disk; see
# docs/conventions.md#stack).
PYTHON  ?= python3.11
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
VENDOR  := book/_vendor
NPMDIR  := .cache/npm
PROFILE ?= default

.PHONY: venv vendor browser tex lint test test-unit bench bench-peers book publish pdf book-html clean clean-cache

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[book,test]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# MathJax 3, require.js and the Jupyter widgets HTML manager, fetched from the npm registry at build time and
# served from the book's own static folder, so the HTML works offline and requests nothing from other hosts.
vendor: $(VENDOR)/.done

$(VENDOR)/.done:
	rm -rf $(NPMDIR) $(VENDOR) && mkdir -p $(NPMDIR) $(VENDOR)/html-manager $(VENDOR)/mathjax
	cd $(NPMDIR) && npm pack --silent mathjax@3.2.2 requirejs@2.3.8 @jupyter-widgets/html-manager@1.0.15 >/dev/null
	cd $(NPMDIR) && for f in *.tgz; do mkdir -p "$${f%.tgz}" && tar xzf "$$f" -C "$${f%.tgz}"; done
	cp $(NPMDIR)/requirejs-2.3.8/package/require.js $(VENDOR)/require.min.js
	cp $(NPMDIR)/jupyter-widgets-html-manager-1.0.15/package/dist/*.js $(VENDOR)/html-manager/
	cp -r $(NPMDIR)/mathjax-3.2.2/package/es5/. $(VENDOR)/mathjax/
	touch $@

# Chromium for the browser tests (Debian's package: `playwright install` cannot download browsers here).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# XeLaTeX for the PDF edition (Debian's texlive; FreeSerif is Sphinx's XeLaTeX font, with the book's Greek and maths).
TEX_PACKAGES := texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended texlive-xetex latexmk fonts-freefont-otf
tex:
	@command -v xelatex >/dev/null && command -v latexmk >/dev/null && fc-list | grep -q FreeSerif || \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends $(TEX_PACKAGES) >/dev/null)

# ruff (its version pinned in constraints.txt, its rules in pyproject.toml): lint, then formatting, both read-only.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The tests, then the result store as a regression test of the numerics: stored Iris jobs of the quick (default)
# profile, drawn with the commit as seed while their recorded times add up to 4 minutes, recomputed and compared.
# Iris only: its float64 jobs came back to round-off on another machine, while the float32 CNN jobs moved well
# beyond it (README, "The result store"); those are verified on the machine that stored them, not in CI.
VERIFY_SEED = $$(printf '%d' 0x$$(git rev-parse --short=6 HEAD 2>/dev/null || echo 0))
test: venv vendor browser tex lint
	TQDM_DISABLE=1 $(PY) -m pytest -q
	TQDM_DISABLE=1 $(VENV)/bin/fragile verify --section iris --profile default --within 240 --seed $(VERIFY_SEED)

test-unit: venv
	TQDM_DISABLE=1 $(PY) -m pytest -q tests --ignore=tests/book

bench: venv
	$(PY) benchmarks/loo_batched.py
	$(PY) benchmarks/sweep_scaling.py
	$(PY) benchmarks/exact_hessian.py

# The league table against other influence libraries (benchmarks/peers.py: about 10 minutes on 2 cores). The peers
# are the optional extra `peers`; `make book` and `make test` never need them. They are installed under
# constraints.txt, which pins torch, so installing them cannot replace it (checked after the install). torch-influence is not on PyPI: give its source,
# e.g. TORCH_INFLUENCE_SRC=git+https://github.com/alstonlo/torch-influence, to install it too (--no-deps: it needs
# only numpy, scipy and torch).
TORCH_INFLUENCE_SRC ?=
PEERS_OUT ?= results/06_estimands/peers.json

bench-peers: venv
	$(PY) -m pip install --quiet -c constraints.txt -e '.[peers]'
	$(if $(TORCH_INFLUENCE_SRC),$(PY) -m pip install --quiet --no-deps '$(TORCH_INFLUENCE_SRC)')
	$(PY) -c "import re, torch; pin = re.search(r'^torch==(\S+)', open('constraints.txt').read(), re.M).group(1); \
	    v = torch.__version__.split('+')[0]; assert v == pin, 'torch changed to ' + v + ', constraints.txt pins ' + pin"
	$(PY) benchmarks/peers.py --check
	$(PY) benchmarks/peers.py --out $(PEERS_OUT)

# Execute every chapter with $(PROFILE) into book/sections/, then build the HTML (warnings are errors).
book: venv vendor
	TQDM_DISABLE=1 $(VENV)/bin/fragile book --profile $(PROFILE)
	@echo "open book/_build/html/index.html"

# Only the HTML, from the committed executed chapters.
# The PDF edition, from the committed executed chapters: book/_build/latex/fragile.pdf.
pdf: venv tex
	$(VENV)/bin/jupyter-book build book --builder pdflatex -W -n

# The committed edition: compute into results/store every job it lacks (resumable: each job is stored as it
# finishes), then execute every chapter from the store. `make book` afterwards recomputes nothing that is stored.
publish: venv vendor
	TQDM_DISABLE=1 $(VENV)/bin/fragile book --publish --profile $(PROFILE)

book-html: venv vendor
	$(VENV)/bin/fragile book --no-run

# Keeps .cache/ (the finished sweep jobs: hours of work, reused by every rerun); `make clean-cache` removes it.
clean:
	rm -rf $(VENV) book/_build $(VENDOR) .pytest_cache

# Removes .cache/: every finished job (hours of CPU) and the npm download of `make vendor`; the next run recomputes all.
clean-cache:
	rm -rf .cache
