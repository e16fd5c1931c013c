# CUDA-capable image: PyPI's Linux torch wheels bundle the CUDA runtime; run with `docker run --gpus all ...`
# (NVIDIA Container Toolkit on the host). gcc builds lpl's CPU kernels (C) on first use. W&B logs offline unless
# the container gets a login (`-e WANDB_API_KEY=...`), as `lpl` does everywhere.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lpl
COPY pyproject.toml README.md LICENSE ./
COPY lpl ./lpl
COPY kernels ./kernels
COPY configs ./configs
# the sources go once installed: left in the working folder, ./lpl (which has no kernels/) would shadow the
# installed package for `python -m lpl` and `import lpl.kernels`
RUN pip install . && rm -rf lpl kernels build

ENTRYPOINT ["lpl"]
CMD ["--help"]
