# Fieldgate's everyday recipes. `just --list` shows them.

# Build everything (debug).
build:
    cargo build --workspace

# The test command of the README and of CI.
test:
    cargo test --workspace

# What CI runs: formatting, lints, then the tests.
ci:
    bash .ci/run

# Format the code.
fmt:
    cargo fmt --all

# The benchmarks of BENCHMARKS.md (criterion; results in target/criterion).
bench:
    cargo bench -p fieldgate-shared --bench codec
    cargo bench -p fieldgate-firmware-bridge --bench frames

# Bytes per reading of the batch codec on synthetic sensor data.
estimate n="1000000":
    cargo run --release -- codec estimate --synthetic {{n}}

# Fuzz the batch decoder and the serial frame decoder for `secs` seconds each (needs
# `cargo install cargo-fuzz`; runs on stable through RUSTC_BOOTSTRAP, as cargo-fuzz wants
# nightly flags).
fuzz secs="60":
    cargo run -q -p fieldgate-shared --example fuzz_seeds -- fuzz/corpus/decode_batch
    cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run decode_batch -- -max_total_time={{secs}}
    cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run decode_frames -- -max_total_time={{secs}}

# Cross-compile the CLI and the edge agent for 64-bit ARM with Debian's rustc and target std (see README).
cross-arm64:
    RUSTC=/usr/bin/rustc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    cargo build --release --target aarch64-unknown-linux-gnu -p fieldgate-edge
    # The CLI without `demo` (which embeds the cloud): what an installer needs on the box.
    RUSTC=/usr/bin/rustc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    cargo build --release --target aarch64-unknown-linux-gnu -p fieldgate --no-default-features
