# project-relay as a container: build with the Rust image, run on distroless as non-root.
# The binary is the same `cargo build --release --locked` build the README, the tests' CI and
# bench/ use. Build: docker build -t project-relay .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/project-relay /usr/local/bin/project-relay
COPY deploy/relay.toml /etc/project-relay/relay.toml
ENV PROJECT_RELAY_CONFIG=/etc/project-relay/relay.toml
USER nonroot
# SMTP (STARTTLS when a certificate is mounted), admin (metrics, health, capture inbox).
EXPOSE 2525 9090
HEALTHCHECK --interval=10s --timeout=5s --retries=3 CMD ["/usr/local/bin/project-relay", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/project-relay"]
CMD ["serve"]
