# GPU image: CUDA toolkit (nvcc, for DeepSpeed's JIT-built fused Adam), the project installed
# editable (hydra reads conf/ from the checkout), the real-data packages for the demo, torchrun as
# the entry point. The torch 2.14.1 wheels bring their own CUDA 13 runtime libraries.
#
#   docker build -t clipforge .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/clipforge/runs clipforge \
#       --standalone --nproc_per_node=gpu -m pretrain.train +experiment=demo
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
        ca-certificates dataset-fashion-mnist tuxpaint-stamps-default \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/clipforge
# Dependencies first, so code edits do not reinstall them.
COPY setup.py ./
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && mkdir -p pretrain data_prep launch && touch pretrain/__init__.py data_prep/__init__.py launch/__init__.py \
 && /opt/venv/bin/pip install -e '.[dev]'
COPY . .
ENV PATH=/opt/venv/bin:$PATH

ENTRYPOINT ["torchrun"]
CMD ["--standalone", "--nproc_per_node=gpu", "-m", "pretrain.train", "+experiment=demo"]
