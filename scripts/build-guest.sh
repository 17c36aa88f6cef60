#!/bin/sh
# Build the static godwit-guest binary (release, glibc, crt-static) and
# print its path on stdout. Idempotent: cargo rebuilds only what changed.
#
# The explicit --target keeps RUSTFLAGS away from build scripts and
# proc-macros (they are built for the host without crt-static).
# Respects CARGO_TARGET_DIR; defaults to <repo>/target.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
target=x86_64-unknown-linux-gnu
: "${CARGO_TARGET_DIR:=$repo/target}"
export CARGO_TARGET_DIR
cd "$repo"
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
    cargo build --quiet -p godwit-guest --release --target "$target" >&2
bin="$CARGO_TARGET_DIR/$target/release/godwit-guest"
# A static(-pie) executable has no program interpreter.
if readelf -l "$bin" 2>/dev/null | grep -q 'Requesting program interpreter'; then
    echo "build-guest.sh: $bin is not statically linked" >&2
    exit 1
fi
echo "$bin"
