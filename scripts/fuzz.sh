#!/usr/bin/env bash
# Runs one fuzz target for SECONDS: scripts/fuzz.sh TARGET SECONDS
# Targets: adapter_config, safetensors_header, shard_index, adapter_dir.
# Needs `cargo install cargo-fuzz`; RUSTC_BOOTSTRAP lets the stable toolchain take the
# sanitizer flags cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
target=${1:?target}; secs=${2:-600}
RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$target" -- -max_total_time="$secs" -max_len=65536
