#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ briefly, starting from its seeds.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 10 (the quick run for tests); use minutes or
# hours by hand. TARGETs default to every target in fuzz/fuzz_targets/.
#
# Environment:
#   FUZZ_SANITIZER  address (default) or none: passed to `cargo fuzz -s`.
#
# The toolchain is the repository's stable one (rust-toolchain.toml).
# cargo-fuzz needs nightly-only flags (-Zsanitizer, -Cpasses=sancov-module,
# …); RUSTC_BOOTSTRAP=1 lets the stable compiler accept them. It is set only
# for the fuzz build, never for the main workspace.
#
# Inputs found to grow coverage go to fuzz/corpus/<target>/ (gitignored);
# crashing inputs to fuzz/artifacts/<target>/ (gitignored). Crashes worth
# keeping belong in fuzz/regressions/<target>/, which are replayed first.
# Exits non-zero if any target crashes (or fails to build).
set -euo pipefail

# Pinned so every machine fuzzes with the same driver.
CARGO_FUZZ_VERSION=0.13.2
DEFAULT_SECONDS=10
# A single input taking longer than this is reported as a hang.
INPUT_TIMEOUT_S=10

secs=${1:-$DEFAULT_SECONDS}
if ! [[ $secs =~ ^[0-9]+$ ]] || ((secs < 1)); then
    echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi
shift $(($# > 0 ? 1 : 0))

root=$(cd "$(dirname "$0")/.." && pwd)
fuzz_dir=$root/fuzz
sanitizer=${FUZZ_SANITIZER:-address}
# Each sanitizer builds everything with different flags: give the others
# their own target dir so switching does not throw away the default build.
fuzz_args=(-s "$sanitizer")
if [[ $sanitizer != address ]]; then
    fuzz_args+=(--target-dir "$fuzz_dir/target/sanitizer-$sanitizer")
fi

export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1
# The fuzz workspace keeps its own target dir (gitignored); never inherit
# one meant for the main workspace.
unset CARGO_TARGET_DIR
# Full backtraces in crash reports.
export RUST_BACKTRACE=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION (compiles from source, ~1-2 min)"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

cd "$fuzz_dir"
if (($# > 0)); then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

t0=$SECONDS
echo "fuzz: building ${#targets[@]} targets (sanitizer: $sanitizer)"
if ((${#targets[@]} == 1)); then
    cargo fuzz build "${fuzz_args[@]}" "${targets[0]}"
else
    cargo fuzz build "${fuzz_args[@]}"
fi
echo "fuzz: build took $((SECONDS - t0)) s"

# run_target TARGET LOG DIR...: one timed fuzz run, its output in LOG.
run_target() {
    local t=$1 log=$2
    shift 2
    # Marks the start, so crash_reported finds reproducers of this run only.
    touch "$fuzz_dir/artifacts/.$t.start"
    cargo fuzz run "${fuzz_args[@]}" "$t" "$@" -- \
        -max_total_time="$secs" -timeout="$INPUT_TIMEOUT_S" -print_final_stats=1 \
        >"$log" 2>&1
}

# crash_reported TARGET LOG: whether the run left a finding behind.
crash_reported() {
    local t=$1 log=$2
    grep -qE "panicked|ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)|^SUMMARY|Test unit written" "$log" ||
        [[ -n $(find "$fuzz_dir/artifacts/$t" -type f -newer "$fuzz_dir/artifacts/.$t.start" 2>/dev/null) ]]
}

failed=()
summary=()
for t in "${targets[@]}"; do
    corpus=$fuzz_dir/corpus/$t
    seeds=$fuzz_dir/seeds/$t
    regressions=$fuzz_dir/regressions/$t
    log=$fuzz_dir/artifacts/$t.log
    mkdir -p "$corpus" "$fuzz_dir/artifacts"
    dirs=("$corpus")
    [[ -d $seeds ]] && dirs+=("$seeds")
    # Known crashers are loaded with the seeds, so a regression fails at once.
    [[ -d $regressions ]] && dirs+=("$regressions")

    echo "fuzz: $t for ${secs}s"
    rc=0
    run_target "$t" "$log" "${dirs[@]}" || rc=$?
    if ((rc != 0)) && ! crash_reported "$t" "$log"; then
        # libFuzzer reports every finding (panic, sanitizer error, timeout,
        # OOM, leak) in its log and writes a reproducer. A non-zero exit
        # without either means the process was stopped from outside (a
        # signal, the OOM killer); that is not a finding, so say so and run
        # the target once more rather than report a crash nobody can replay.
        echo "fuzz: $t exited with status $rc but reported no crash; running it again" >&2
        { grep -m1 "^Error:" "$log" || tail -n 3 "$log"; } >&2 || true
        rc=0
        run_target "$t" "$log" "${dirs[@]}" || rc=$?
    fi

    # A crash while loading the corpus leaves no stats: count 0, never abort.
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s += $2} END {print s + 0}' || true)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1 | awk '{print $2}' || true)
    size=$(find "$corpus" -type f | wc -l)
    if ((rc == 0)); then
        summary+=("$(printf '%-16s ok     %10s runs  cov %-6s corpus %s' "$t" "$runs" "${cov:-?}" "$size")")
    else
        failed+=("$t")
        summary+=("$(printf '%-16s CRASH  %10s runs  exit %s  (log: %s)' "$t" "$runs" "$rc" "${log#"$root"/}")")
        # The report (panic message, backtrace, reproducer path) for the caller.
        { grep -E -A40 "panicked|ERROR: (libFuzzer|AddressSanitizer)" "$log" || tail -n 40 "$log"; } | head -n 60 >&2 || true
        grep -E "^(SUMMARY|artifact_prefix|Test unit written)" "$log" >&2 || true
    fi
done

echo "fuzz: summary (${secs}s per target, $((SECONDS - t0)) s in all)"
printf '  %s\n' "${summary[@]}"
if ((${#failed[@]} > 0)); then
    echo "fuzz: ${#failed[@]} target(s) crashed: ${failed[*]}; reproducers in fuzz/artifacts/" >&2
    exit 1
fi
