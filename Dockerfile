# backupy-agent images.
#
#   docker build -t backupy-agent .                  # minimal: static binary on scratch
#   docker build --target tools -t backupy-agent:tools .   # + pg_dump, mariadb-dump,
#                                                    #   redis-cli, sqlite3 (TCP strategy)
#
# Both run as the non-root user 10001 with their state in the volume /var/lib/backupy.
# scripts/image-smoke.sh builds the runtime stage below from a locally built binary
# (no base image can be pulled there) and runs it against local services.

ARG RUST_VERSION=1.95
ARG DEBIAN_VERSION=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_VERSION} AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
# Empty: build.rs asks git (the context includes .git).
ARG GIT_COMMIT=
ENV BACKUPY_GIT_COMMIT=${GIT_COMMIT}
WORKDIR /src
COPY . .
# An image is updated by pulling a new one: its binary has no self-update (no update key).
RUN BACKUPY_RELEASE_NO_SELF_UPDATE=1 RELEASE_TARGETS=x86_64-unknown-linux-musl RELEASE_OUT=/out scripts/release.sh \
    && cp /out/x86_64-unknown-linux-musl/backupy-agent /backupy-agent \
    && dist/docker/rootfs.sh /rootfs

FROM debian:${DEBIAN_VERSION}-slim AS tools
ARG VERSION=dev
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="backupy-agent (with dump tools)" \
      org.opencontainers.image.description="Database backup agent with pg_dump, mariadb-dump, redis-cli and sqlite3 for the TCP strategy" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client mariadb-client redis-tools sqlite3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 backupy \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/backupy --shell /usr/sbin/nologin backupy \
    && install -d -o 10001 -g 10001 -m 700 /var/lib/backupy
COPY --from=builder /backupy-agent /usr/local/bin/backupy-agent
ENV BACKUPY_STATE_DIR=/var/lib/backupy
VOLUME /var/lib/backupy
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["/usr/local/bin/backupy-agent", "health-check"]
ENTRYPOINT ["/usr/local/bin/backupy-agent"]
CMD ["run", "--config", "/etc/backupy/backupy.toml"]

# The default target. Keep this stage self-contained: image-smoke.sh reuses it verbatim
# (from the next line to the end of the file) behind a local `builder` stage.
FROM scratch AS runtime
ARG VERSION=dev
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="backupy-agent" \
      org.opencontainers.image.description="Database backup agent: dump, compress, encrypt and store in constant memory" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
COPY --from=builder /rootfs/base/ /
COPY --from=builder --chown=10001:10001 /rootfs/state/backupy /var/lib/backupy
COPY --from=builder /backupy-agent /usr/local/bin/backupy-agent
ENV BACKUPY_STATE_DIR=/var/lib/backupy
VOLUME /var/lib/backupy
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["/usr/local/bin/backupy-agent", "health-check"]
ENTRYPOINT ["/usr/local/bin/backupy-agent"]
CMD ["run", "--config", "/etc/backupy/backupy.toml"]
