//! The whole suite against the Rust payments example (`crates/client/examples/payments.rs`, on
//! the `Idempotency-Key` tower layer) and the real coordinator binary, both built here.

use std::path::{Path, PathBuf};
use std::process::Command;

use idempotency_http_conformance::{Target, run_all};

/// target/<profile>, from target/<profile>/deps/<this test>.
fn profile_dir() -> PathBuf {
    let test_binary = std::env::current_exe().expect("the test knows its path");
    test_binary.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_owned()
}

/// Runs `cargo build --quiet <args>` in the profile of this test.
fn cargo_build(args: &[&str]) {
    let mut build = Command::new(env!("CARGO"));
    build.args(["build", "--quiet"]).args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir().ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "cargo build {} failed", args.join(" "));
}

/// `path` quoted for `sh`.
fn shell_quoted(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_payments_example_passes_every_check() {
    cargo_build(&["-p", "idempotency-client", "--features", "http", "--example", "payments"]);
    cargo_build(&["-p", "idempotency-coordinator", "--bin", "idempotency-coordinator"]);
    let profile = profile_dir();
    let example = profile.join("examples").join("payments");
    let target = Target {
        start: format!("exec {} --listen {{listen}} --coordinator {{coordinator}} {{flags}}", shell_quoted(&example)),
        coordinator_binary: profile.join("idempotency-coordinator"),
    };
    let report = run_all(&target).await;
    println!("{report}");
    assert!(report.passed(), "{report}");
}
