# One image for both roles: the coordinator and volunteer nodes (see docker-compose.yml).
#   docker build -t volunteer-swarm .
#   docker run --rm -p 7070:7070 -p 7080:7080 volunteer-swarm swarm-coordinator serve --state-dir /state
# CPU torch by default; for NVIDIA GPUs build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
# and run nodes with --gpus all ... swarm-node join --device cuda.
FROM python:3.11-slim

ARG TORCH_SPEC=torch
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends iproute2 \
    && rm -rf /var/lib/apt/lists/*

RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

WORKDIR /opt/swarm
COPY pyproject.toml README.md ./
COPY swarm ./swarm
COPY node ./node
COPY coordinator ./coordinator
RUN pip install .

RUN useradd --create-home --uid 1000 swarm && mkdir -p /state && chown swarm /state
USER swarm
VOLUME ["/state"]
EXPOSE 7070 7080

CMD ["swarm-coordinator", "serve", "--port", "7070", "--http-port", "7080", "--state-dir", "/state"]
