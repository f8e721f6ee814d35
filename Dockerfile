# localnfs: one image for the node agent, the controller and the scheduler helper.
# Build (not possible on the development machines, which have no image builder):
#   docker build -t <your-registry>/localnfs:0.1.0 .
# Stage 1 builds a release binary on Debian (glibc, like the runtime image); stage 2
# copies it into a slim Debian base with nothing else installed.
#
# Base images are pinned by digest (the index digest, covering every platform), so a
# rebuild of the same commit starts from the same bytes; the tag is kept in front for
# the reader. These digests are the ones docker-library/repo-info records for
# rust:1.98.0-bookworm (built 25 Aug 2026) and debian:bookworm-20260918-slim; they
# were read there, not pulled here. Refresh both at each release (README,
# "Releasing"), or override one with --build-arg for a local build.
# scripts/check-manifests fails if a FROM is not pinned this way.
ARG BUILD_IMAGE=rust:1.98.0-bookworm@sha256:82150a52ec202c1b14d7817e14516c392bb7f5cfebd88f1ed531cb37ebd39922
ARG RUNTIME_IMAGE=debian:bookworm-20260918-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crates ./crates
COPY benches ./benches
COPY tests ./tests
# Without the `demo` feature: the test cluster harness (crates/testbed) is not in the
# shipped binary.
RUN cargo build --release --locked --no-default-features --bin localnfs

FROM ${RUNTIME_IMAGE}
COPY --from=build /src/target/release/localnfs /usr/local/bin/localnfs
# The controller and the scheduler helper run as this user (deploy/ sets it too); the
# node agent overrides it with uid 0 and a short capability list (see
# deploy/base/node.yaml).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/localnfs"]
