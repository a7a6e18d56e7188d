//! Helpers of the `phalanx` binary's end-to-end tests: run it, scratch directories, configs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod sweep;
use sweep::sweep_stale;

/// Runs the binary in the workspace root with `args`, logging at warn.
pub fn phalanx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("phalanx runs")
}

/// A scratch directory for this test process (directories of earlier, finished test
/// processes are removed first).
pub fn tmp(name: &str) -> PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| sweep_stale("phalanx-cli-"));
    let d = std::env::temp_dir().join(format!("phalanx-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn refused(args: &[&str]) -> String {
    let o = phalanx(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected a clean refusal, got {:?}: {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

pub fn write_config(name: &str, edit: impl Fn(String) -> String) -> String {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/micro.toml"))
            .unwrap();
    let p = tmp("cfg").join(name);
    std::fs::write(&p, edit(text)).unwrap();
    p.to_str().unwrap().to_string()
}

pub fn run_json(args: &[&str]) -> serde_json::Value {
    let o = phalanx(args);
    assert!(
        o.status.success(),
        "{:?}: {}",
        args,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}
