# covalent-lot: `make install`, `make demo`, `make test`, `make bench`
# (`make bench-compression`, `make bench-remote`: the benchmarks outside `make bench`).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test unit integration soak bench bench-compression bench-remote clean

install: $(STAMP)

AZURITE := .tools/node_modules/.bin/azurite-blob

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e ".[dev]"
	@# Azurite (Azure Blob emulator) for the integration tests; 3.35.0 is the
	@# last release that runs on Node 20.
	test -x $(AZURITE) || npm install --prefix .tools --no-audit --no-fund --loglevel=error azurite@3.35.0
	touch $(STAMP)

# The seed scenario on local servers: SeaweedFS (S3) + a private Covalent server.
demo: $(STAMP)
	$(PY) -m integration.demo

# Unit tests (no network), then integration tests against real local servers.
test: $(STAMP)
	$(PY) -m pytest tests -q
	$(PY) -m pytest integration -q
	@# SFTP again on paramiko (the default transport is asyncssh when installed); 5 = no sshd here.
	@# The executor suites (second host, Dask cluster) are about execution paths, not transports.
	LOT_BACKENDS=sftp COVALENT_LOT_SFTP_TRANSPORT=paramiko $(PY) -m pytest integration -q \
		--ignore=integration/test_remote.py --ignore=integration/test_host2_smoke.py \
		--ignore=integration/test_dask_smoke.py --ignore=integration/test_slurm.py || test $$? -eq 5

unit: $(STAMP)
	$(PY) -m pytest tests -q

integration: $(STAMP)
	$(PY) -m pytest integration -q

# Long soak: 8 concurrent seed dispatches x 64 MiB per backend, round after round
# (make test runs 3 rounds per backend). MINUTES=30 for longer; writes soak.md/json/png.
soak: $(STAMP)
	$(PY) -m integration.soak --minutes $(or $(MINUTES),10) --size-mib 64 --concurrency 8

# Benchmark suite: issue 16's targets in one run (large-file speed and memory vs the
# plain SDKs, Covalent's own strategies and the SSH peers at 512 MiB and 1 GiB; small
# files; the seed handoff end to end with where its time goes), ~40 min on 2 cores;
# QUICK=1 runs the short version. Results in bench/results/latest.md (the compression
# and across-hosts tables are kept from their own targets' last runs).
bench: $(STAMP)
	$(PY) -m bench.suite $(if $(QUICK),--quick,)

# The compression trade-off of @lot.offload (~10 min); updates latest.md/json and
# writes bench/results/compression.md/json/png.
bench-compression: $(STAMP)
	$(PY) -m bench.suite --compression-only $(if $(QUICK),--quick,)

# The seed scenario across hosts through covalent-ssh-plugin (a second host in its
# own mount namespace; needs root and openssh-server). Writes bench/results/remote.*.
bench-remote: $(STAMP)
	$(PY) -m bench.remote $(if $(QUICK),--size-mib 64 --repeats 1,)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
