# syntax=docker/dockerfile:1
#
# backfilld container image.
#
#   docker build -t backfilld .
#   docker run --rm -e DATABASE_URL=postgres://backfilld:...@db:5432/app backfilld migrate
#   docker run -d -p 9187:9187 -e DATABASE_URL=... backfilld          # = backfilld run
#
# The configuration file is /etc/backfilld/backfilld.toml (a copy of config/backfilld.toml; mount your
# own there, e.g. from a Kubernetes ConfigMap). Every key can also be overridden with
# BACKFILLD_<SECTION>__<KEY> environment variables, and DATABASE_URL is always honoured.

############################ build ############################
FROM rust:1-bookworm AS builder
WORKDIR /build

# 1. Dependency layer: build all dependencies against stub sources, so that this (slow) layer is
#    reused as long as Cargo.toml and Cargo.lock do not change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin backfilld \
    && rm -rf src target/release/backfilld target/release/deps/backfilld-* \
        target/release/deps/libbackfilld-* target/release/.fingerprint/backfilld-*

# 2. The crate itself.
COPY src ./src
RUN cargo build --release --locked --bin backfilld \
    && install -m 0755 target/release/backfilld /usr/local/bin/backfilld

############################ runtime ############################
FROM debian:bookworm-slim

# ca-certificates: TLS to PostgreSQL (sslmode=verify-full) and to an OTLP endpoint.
# Not version-pinned on purpose: the base image pins the release (bookworm); we want its security
# updates of the CA bundle at every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 backfilld \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin backfilld

COPY --from=builder /usr/local/bin/backfilld /usr/local/bin/backfilld
COPY config/backfilld.toml /etc/backfilld/backfilld.toml

# Inside a container the metrics/health listener must not be bound to loopback only.
ENV BACKFILLD_CONFIG=/etc/backfilld/backfilld.toml \
    BACKFILLD_METRICS__LISTEN=0.0.0.0:9187 \
    BACKFILLD_LOG__FORMAT=json

# Numeric uid so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /
EXPOSE 9187

# BACKFILLD_CONFIG applies to every subcommand (`docker run IMAGE status`, `... migrate`); an explicit
# `--config PATH` argument takes precedence over it.
ENTRYPOINT ["backfilld"]
CMD ["run"]
