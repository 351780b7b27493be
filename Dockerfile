# posbfl-testbed: one image for the edge agent (`bfl-agent`) and the operator's CLI (`bfl`).
#
# Targets (the last, `full`, is the default):
#   full       train + validate + mine: CPU torch, ONNX Runtime, the embedded amqtt broker
#   validator  validate + mine only (ONNX Runtime); no torch at all
#   broker     Mosquitto from Debian, non-root; mount a config (see the stage below)
# Build: scripts/container/build.sh (timings, local base, CA bundle, local wheels), or simply
#   docker build -t posbfl-testbed:0.1.0 .
#   docker build --target validator -t posbfl-testbed:0.1.0-validator .
# Run a device (configuration by environment, see `bfl-agent run --help`):
#   docker run -d -v bfl-d07:/data -e BFL_DEVICE_ID=d07 -e BFL_CREATE_KEY=1 \
#     -e BFL_BROKER=mqtt://broker.lan:1883 -e BFL_OPERATOR_KEY=<operator public key hex> \
#     posbfl-testbed:0.1.0
# The key is created in /data/device.key on first start; the log shows its fingerprint and
# `bfl-agent keygen` prints a public key. The operator runs, from the same image:
#   docker run --rm -v "$PWD/runs:/data/runs" posbfl-testbed:0.1.0 bfl run --external \
#     --broker mqtt://broker.lan:1883 --devices N --operator-key /data/runs/operator.key ...
#
# Machine-specific things (a CA bundle for a TLS-intercepting proxy, a local wheel folder, a pip
# index) come in as build arguments and build-time mounts, never as files in the image.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------------------------- base
# Python venv in /opt/bfl (works with the official image's /usr/local/bin/python3 and with
# Debian's /usr/bin/python3), offline Fashion-MNIST, the unprivileged user and its data dir.
FROM ${BASE_IMAGE} AS base
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
RUN groupadd --system --gid 10001 bfl \
    && useradd --system --uid 10001 --gid bfl --home-dir /data --no-create-home --shell /usr/sbin/nologin bfl \
    && mkdir -p /data \
    && chown bfl:bfl /data \
    && python3 -m venv /opt/bfl
ENV PATH=/opt/bfl/bin:$PATH \
    VIRTUAL_ENV=/opt/bfl \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 \
    BFL_WORKDIR=/data \
    BFL_KEY=/data/device.key

# ----------------------------------------------------------------------------------- wheels
# The project and its validator + broker dependencies, resolved and built once for both images.
FROM base AS wheels
ARG PIP_CERT=""
ARG PIP_FIND_LINKS=""
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
WORKDIR /src
# Dependencies first, from pyproject.toml alone (an empty package with the project's metadata),
# so that a change in the sources does not resolve and download them again.
# (README.md, the package's long description, is a placeholder here: editing it must not either.)
COPY pyproject.toml ./
RUN touch README.md \
    && pip wheel --wheel-dir /wheels ".[validator,broker]"
COPY README.md ./
COPY edge_agent ./edge_agent
COPY broker ./broker
COPY orchestrator ./orchestrator
# The real project wheel replaces the empty one; requirements.txt pins exactly what was built,
# for the --no-index installs below.
RUN rm -rf /wheels/posbfl_testbed-*.whl build ./*.egg-info \
    && pip wheel --no-deps --wheel-dir /wheels . \
    && for w in /wheels/*.whl; do n="${w##*/}"; v="${n#*-}"; echo "${n%%-*}==${v%%-*}"; done >/wheels/requirements.txt \
    && sed -i 's/^posbfl_testbed==/posbfl_testbed[validator,broker]==/' /wheels/requirements.txt \
    && cat /wheels/requirements.txt

# -------------------------------------------------------------------------------- validator
# (Stages install into /opt/bfl and the final images copy the venv: buildah 1.28, podman 4.3's,
# cannot bind-mount a cached stage with RUN --mount=from=...)
FROM base AS validator-venv
COPY --from=wheels /wheels /tmp/wheels
RUN pip install --no-index --find-links /tmp/wheels --requirement /tmp/wheels/requirements.txt \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

FROM base AS validator
COPY --from=validator-venv /opt/bfl /opt/bfl
USER 10001:10001
WORKDIR /data
# Without torch the agent announces itself as validate,mine.
CMD ["bfl-agent", "run"]

# ----------------------------------------------------------------------------------- broker
# A Mosquitto 2 broker. The default config is broker/mosquitto/mosquitto.conf (password file +
# per-device ACL, no anonymous clients): mount the password file at /etc/mosquitto/bfl/passwd
# (mosquitto_passwd), or mount your own config over /etc/mosquitto/bfl/mosquitto.conf, e.g.
# one rendered by `python -m broker.mosquitto render --devices d00..d19 --out DIR`.
FROM ${BASE_IMAGE} AS broker
ARG DEBIAN_FRONTEND=noninteractive
# A fixed uid/gid (10002) for the mosquitto user, made before the package's postinst would
# pick one, so that USER is numeric and volume ownership is predictable.
RUN groupadd --system --gid 10002 mosquitto \
    && useradd --system --uid 10002 --gid mosquitto --home-dir /var/lib/mosquitto --no-create-home \
        --shell /usr/sbin/nologin mosquitto \
    && apt-get update \
    && apt-get install -y --no-install-recommends mosquitto \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && mkdir -p /var/lib/mosquitto \
    && chown mosquitto:mosquitto /var/lib/mosquitto
COPY broker/mosquitto/mosquitto.conf broker/mosquitto/acl /etc/mosquitto/bfl/
USER 10002:10002
EXPOSE 1883
CMD ["/usr/sbin/mosquitto", "-c", "/etc/mosquitto/bfl/mosquitto.conf"]

# ------------------------------------------------------------------------------------ torch
# CPU-only torch, by default from the PyTorch CPU index. To take it from a mounted folder of
# wheels instead: PIP_FIND_LINKS=<folder>, TORCH_INDEX_URL=https://pypi.org/simple (or a mirror,
# for torch's own dependencies) and TORCH_VERSION=2.13.0+cpu (the local version label matters:
# plain 2.13.0 from PyPI is the multi-GB CUDA build).
FROM base AS torch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG PIP_CERT=""
ARG PIP_FIND_LINKS=""
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" \
    && python -c "import torch; assert not torch.cuda.is_available(); print('torch', torch.__version__)"

# ------------------------------------------------------------------------------------- full
FROM torch AS full-venv
COPY --from=wheels /wheels /tmp/wheels
RUN pip install --no-index --find-links /tmp/wheels --requirement /tmp/wheels/requirements.txt

FROM base AS full
COPY --from=full-venv /opt/bfl /opt/bfl
USER 10001:10001
WORKDIR /data
CMD ["bfl-agent", "run"]
