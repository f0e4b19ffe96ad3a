//! Fuzz targets for peft-rs's file readers (issue 14), shared by the libFuzzer binaries in `fuzz_targets/` and
//! the replay test over the committed corpora (`tests/replay.rs`).
//!
//! Each function in [`targets`] takes arbitrary bytes, feeds them to one reader the way the CLI does (written to a
//! scratch file, since the readers take paths and map files), and goes on through everything the result allows
//! (every tensor, model construction, preprocessing, writing the output and parsing it again). A target returns
//! normally for any input the code rejects with a typed error; a panic (including an arithmetic overflow: the
//! `fuzz` profile has overflow checks on), a failed invariant (`assert!` below) or an allocation over the
//! [`alloc::CAP`] is a crash for the fuzzer.
//!
//! How the fuzzer is built and why libFuzzer: see `fuzz/README.md`.

pub mod alloc;
// Not in the lib test build (`cargo clippy --all-targets` checks it although `test = false`): the xtask files
// compiled in below carry test modules that need the rest of xtask.
#[cfg(not(test))]
mod scratch;
#[cfg(not(test))]
pub mod targets;

// xtask is a binary crate; the code the CLI runs on these inputs is compiled in here from its own source files, so
// the fuzzer exercises exactly that code.
#[cfg(not(test))]
#[allow(dead_code, unused_imports, missing_docs)]
#[path = "../../xtask/src/glue/mod.rs"]
mod glue;
#[cfg(not(test))]
#[allow(dead_code, unused_imports, missing_docs)]
#[path = "../../xtask/src/quantize.rs"]
mod quantize;

/// The counting allocator: every target runs under the [`alloc::CAP`].
#[global_allocator]
static GLOBAL: alloc::CapAlloc = alloc::CapAlloc;

/// Splits a fuzz input into two files: a little-endian `u32` length `n`, then `n` bytes of the first file (fewer
/// when the input is shorter), then the rest as the second file. Inputs under 4 bytes give two empty files.
pub fn split2(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<4>() else { return (&[], &[]) };
    let n = (u32::from_le_bytes(*head) as usize).min(rest.len());
    rest.split_at(n)
}

/// The inverse of [`split2`]: the input that splits into `a` and `b` (for writing seeds).
///
/// # Panics
/// When `a` is longer than `u32::MAX` bytes (seeds are small).
pub fn join2(a: &[u8], b: &[u8]) -> Vec<u8> {
    let n = u32::try_from(a.len()).expect("seed part under 4 GiB");
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(a);
    out.extend_from_slice(b);
    out
}
