# syntax=docker/dockerfile:1
#
# One image with the three livepatch binaries:
#   /usr/local/bin/livepatch-operator   the operator (Deployment; runs as uid 65532)
#   /usr/local/bin/node-agent           the node agent (DaemonSet; the chart runs it as uid 0
#                                        with CAP_SYS_PTRACE only, see docs/install.md)
#   /usr/local/bin/livepatch            the engine's CLI (status/revert by hand, `kubectl exec`)
#
# The build command is the one the tests use (scripts/test.sh, tests/e2e/run.py): the same
# packages, the release profile of the workspace, --locked. So the image holds the binaries
# the end-to-end tests ran.
#
#   docker build -t registry.example.com/livepatch:0.1.0 .

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

# ---- build: glibc of Debian 12, the same as the runtime image
FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p livepatch-operator -p node-agent -p livepatch-cli \
 && install -D -m 0755 -t /out target/release/livepatch-operator target/release/node-agent target/release/livepatch

# ---- runtime: glibc, libgcc, CA certificates (https bundle URLs), no shell, no package manager
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="livepatch" \
      org.opencontainers.image.description="Live procedure update for Kubernetes: operator, node agent and CLI" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/ /usr/local/bin/
# nonroot (65532:65532) is the default user: what the operator needs. The agent's pod spec
# sets runAsUser: 0 for ptrace (the chart does it; nothing else in the image needs root).
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/livepatch-operator"]
