# `make run` sets everything up and starts the stack; `make test` sets up and runs the suite.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
export PORT

.PHONY: run test bench eval eval-retrieval setup venv redis migrate index model browser check-deploy soak lint clean

# Reinstall only when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

redis: venv
	$(PY) manage.py ensure_redis

migrate: venv
	$(PY) manage.py migrate --noinput

model: venv
	$(PY) manage.py train_demo_model

# Embeds only the knowledge documents that changed since the last run.
index: migrate
	$(PY) manage.py build_index

setup: venv redis migrate index model

# LEAFRESH_GPU_WORKERS=N starts N GPU workers (honcho's worker.1 … worker.N), each on a GPU of its own
# where the machine has GPUs or LEAFRESH_GPU_DEVICES lists them (bin/gpu-worker).
run: export LEAFRESH_GPU_WORKERS ?= 1
run: setup
	@case '$(LEAFRESH_GPU_WORKERS)' in '' | 0* | *[!0-9]*) echo "LEAFRESH_GPU_WORKERS must be a whole number from 1" >&2; exit 1 ;; esac
	@echo
	@echo "Leafresh chat server on http://127.0.0.1:$(PORT)/  (the chat page; admin at /admin/)"
	@echo "Try the SSE stream:"
	@echo "  curl -N 'http://127.0.0.1:$(PORT)/ai/chatbot/recommendation/base-info?sessionId=demo-1&location=%EB%8F%84%EC%8B%9C&workType=%EC%82%AC%EB%AC%B4%EC%A7%81&category=%EC%A0%9C%EB%A1%9C%EC%9B%A8%EC%9D%B4%EC%8A%A4%ED%8A%B8'"
	@echo "  curl -N 'http://127.0.0.1:$(PORT)/ai/chatbot/recommendation/free-text?sessionId=demo-2&message=%EC%9D%BC%ED%9A%8C%EC%9A%A9%ED%92%88%EC%9D%84%20%EC%A4%84%EC%9D%B4%EA%B3%A0%20%EC%8B%B6%EC%96%B4%EC%9A%94'"
	@echo "The OpenAI-compatible API: base_url http://127.0.0.1:$(PORT)/v1, model \"leafresh\" (README: OpenAI-compatible API)"
	@echo
	$(VENV)/bin/honcho start -f Procfile -p $(PORT) -c worker=$(LEAFRESH_GPU_WORKERS)

# The browser tests drive Debian's Chromium through Playwright (never a downloaded browser), and a
# Korean font makes their screenshots readable. Installed from Debian's packages when missing.
CHROMIUM ?= /usr/bin/chromium
BROWSER_PACKAGES := chromium fonts-nanum fontconfig
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -y -q
browser:
	@if [ ! -x $(CHROMIUM) ] || ! dpkg-query -W -f='$${Status}' fonts-nanum 2>/dev/null | grep -q 'ok installed'; then \
	  command -v apt-get >/dev/null || { echo "the browser tests need Chromium at $(CHROMIUM) and a Korean font: install them, or set CHROMIUM=/path/to/chromium" >&2; exit 1; }; \
	  echo "installing $(BROWSER_PACKAGES) from Debian's packages for the browser tests"; \
	  $(APT) install --no-install-recommends $(BROWSER_PACKAGES) || { $(APT) update && $(APT) install --no-install-recommends $(BROWSER_PACKAGES); }; \
	fi

# The suite runs twice: on SQLite (the default database) and on PostgreSQL (production's), each stack
# on a fresh database of its own; tests marked no_database run only the first time. POSTGRES_URL names the server (the database itself need not exist).
POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/leafresh
test: setup lint browser
	LEAFRESH_CHROMIUM=$(CHROMIUM) $(VENV)/bin/pytest
	@$(PY) -c "import psycopg, sys; from urllib.parse import urlparse; u = urlparse(sys.argv[1]); psycopg.connect(u._replace(path='/postgres').geturl(), connect_timeout=5).close()" '$(POSTGRES_URL)' \
	  || { echo "PostgreSQL does not answer at $(POSTGRES_URL): the suite's second run needs it (set POSTGRES_URL)" >&2; exit 1; }
	DATABASE_URL=$(POSTGRES_URL) LEAFRESH_CHROMIUM=$(CHROMIUM) $(VENV)/bin/pytest -m "not no_database"

$(VENV)/.bench-installed: requirements-bench.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $@

# Throughput and latency of the engine and the whole stack; writes bench/results/latest.{json,png}.
bench: setup $(VENV)/.bench-installed
	$(PY) bench/run.py

# 200 concurrent streams (SSE and WebSocket, some abandoned) for 10 minutes against one daphne and one
# worker on loopback; writes bench/results/soak.json. SOAK_ARGS="--duration-s 60" for a short one.
soak: setup
	$(PY) bench/soak.py $(SOAK_ARGS)

eval: setup
	$(PY) bench/eval.py

# hit@3 / recall@3 of dense, sparse and hybrid retrieval; writes bench/results/retrieval.{json,md}.
eval-retrieval: setup
	$(PY) bench/eval_retrieval.py

# `manage.py check --deploy` on the documented production settings (deploy/production.env.example),
# with throwaway secrets filled in; any warning fails.
check-deploy: venv
	set -a && . deploy/production.env.example && set +a && \
	  DJANGO_SECRET_KEY="$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(50))')" \
	  LEAFRESH_API_KEYS="$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(32))')" \
	  $(PY) manage.py check --deploy --fail-level WARNING

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) var
