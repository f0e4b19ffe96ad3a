//! Helpers shared by the xtask integration tests: run the built binary, read outputs.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use ndarray::ArrayD;
use peft_core::io::SafeTensorsFile;

/// Runs `xtask ARGS`; panics with its output when it fails.
pub fn xtask(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args.iter().map(|a| a.as_ref())).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "xtask failed: {text}");
    text
}

/// Runs `xtask ARGS` expecting failure; returns stderr.
pub fn xtask_fails(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args.iter().map(|a| a.as_ref())).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "xtask unexpectedly succeeded");
    assert!(!err.contains("panicked"), "xtask panicked: {err}");
    err
}

/// Tensor `name` of a safetensors file.
pub fn tensor(path: &Path, name: &str) -> ArrayD<f32> {
    SafeTensorsFile::open(path).unwrap().get(name).unwrap()
}

/// Largest absolute difference.
pub fn max_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}
