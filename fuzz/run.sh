#!/usr/bin/env bash
# Coverage-guided fuzzing of peft-rs's file readers with libFuzzer on the stable toolchain (see fuzz/README.md).
#
#   fuzz/run.sh build                     build the instrumented fuzz_* binaries
#   fuzz/run.sh smoke [SECONDS]           every target for SECONDS (default 20) from the committed corpus; exits 1
#                                         on the first crash, printing the input as hex
#   fuzz/run.sh run TARGET SECONDS DIR    one long run: corpus DIR/corpus/TARGET (seeded from fuzz/corpus/TARGET),
#                                         crashes in DIR/artifacts/TARGET, log DIR/TARGET.log; prints CPU seconds
#   fuzz/run.sh targets                   the target names
#
# Environment: PEFT_FUZZ_TARGET_DIR (default target/fuzz), extra libFuzzer flags in PEFT_FUZZ_FLAGS,
# PEFT_FUZZ_NO_BUILD=1 to smoke the binaries already built.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS=(safetensors bnb gguf adapter hf_model wav image tsv coco)
HOST=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="${PEFT_FUZZ_TARGET_DIR:-target/fuzz}"
# SanitizerCoverage through rustc's stable `-C passes` / `-C llvm-args`: inline 8-bit edge counters and a PC table
# (libFuzzer's coverage feedback) plus comparison tracing (libFuzzer's CMP-guided mutations). `--target` keeps
# these flags off build scripts and proc macros, which are not linked with libFuzzer. Overflow checks and debug
# assertions come from the `fuzz` profile (workspace Cargo.toml).
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
BIN="$CARGO_TARGET_DIR/$HOST/fuzz"
# -timeout: one input running longer is a finding (a hang); -rss_limit_mb: a backstop above the 256 MiB heap cap
# of the targets' own allocator (mapped files and libFuzzer's own memory count here).
FLAGS=(-timeout=30 -rss_limit_mb=2048 -max_len=262144 -print_final_stats=1 ${PEFT_FUZZ_FLAGS:-})

build() {
    nice cargo build -p peft-fuzz --features libfuzzer --profile fuzz --target "$HOST" --bins
}

hexdump_input() {
    od -An -tx1 -v "$1" | tr -d ' \n' | fold -w 128
    echo
}

case "${1:-}" in
build) build ;;
targets) printf '%s\n' "${TARGETS[@]}" ;;
smoke)
    secs="${2:-20}"
    [ -n "${PEFT_FUZZ_NO_BUILD:-}" ] || build
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    for t in "${TARGETS[@]}"; do
        mkdir -p "$work/$t" "$work/crash-$t"
        start=$(date +%s)
        # A fixed libFuzzer seed, but the run is not repeatable: the targets' HashMaps iterate in a random order
        # and the smoke is time-bounded, so coverage (and the mutations that follow) differ between runs. Two
        # gguf runs of 20,000 inputs at seed 1 added 521 and 502 corpus entries. What makes a CI crash
        # reproducible is the input, printed below as hex; long `run` campaigns are what keep the smoke quiet.
        if ! "$BIN/fuzz_$t" "${FLAGS[@]}" -seed="${PEFT_FUZZ_SEED:-1}" -max_total_time="$secs" \
            -artifact_prefix="$work/crash-$t/" \
            "$work/$t" "fuzz/corpus/$t" >"$work/$t.log" 2>&1; then
            tail -n 60 "$work/$t.log"
            for f in "$work/crash-$t"/*; do
                [ -f "$f" ] || continue
                echo "== fuzz target $t crashed on $(basename "$f") ($(stat -c %s "$f") bytes), input as hex:"
                hexdump_input "$f"
            done
            echo "fuzz smoke: target $t FAILED (reproduce: save the hex above to a file, then"
            echo "  cargo run -p peft-fuzz --features libfuzzer --bin fuzz_$t -- FILE)"
            exit 1
        fi
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log" | tail -1)
        echo "fuzz smoke: $t ok, ${execs:-?} executions in $(( $(date +%s) - start )) s, $(ls "$work/$t" | wc -l) new inputs"
    done
    ;;
run)
    t="$2"; secs="$3"; dir="$4"
    mkdir -p "$dir/corpus/$t" "$dir/artifacts/$t"
    cp -n "fuzz/corpus/$t"/* "$dir/corpus/$t/" 2>/dev/null || true
    TIMEFORMAT="cpu_seconds $t user %U sys %S wall %R"
    { time "$BIN/fuzz_$t" "${FLAGS[@]}" -max_total_time="$secs" -artifact_prefix="$dir/artifacts/$t/" \
        "$dir/corpus/$t" >"$dir/$t.log" 2>&1; } 2>>"$dir/$t.time" || echo "exit $? (see $dir/$t.log)" >>"$dir/$t.time"
    ;;
*)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
