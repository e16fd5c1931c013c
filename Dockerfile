# CUDA-capable image: PyPI's Linux torch wheels bundle the CUDA runtime; run with `docker run --gpus all ...`
# (NVIDIA Container Toolkit on the host). gcc builds lpl's CPU block-sparse kernel on first use.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 WANDB_MODE=offline
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lpl
COPY pyproject.toml README.md ./
COPY lpl ./lpl
COPY kernels ./kernels
COPY configs ./configs
RUN pip install .

ENTRYPOINT ["lpl"]
CMD ["--help"]
