# localnfs: one image for the node agent, the controller and the scheduler helper.
# Build (not possible on the development machines, which have no image builder):
#   docker build -t <your-registry>/localnfs:0.1.0 .
# Stage 1 builds a release binary on Debian (glibc, like the runtime image); stage 2
# copies it into a slim Debian base with nothing else installed.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --bin localnfs

FROM debian:bookworm-slim
COPY --from=build /src/target/release/localnfs /usr/local/bin/localnfs
# The controller and the scheduler helper run as this user (deploy/ sets it too); the
# node agent overrides it with uid 0 and a short capability list (see deploy/node.yaml).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/localnfs"]
