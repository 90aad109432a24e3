//! `betadpo quickstart` runs the whole pipeline on the bundled assets and prints its table.

mod common;

use std::process::Command;

#[test]
fn quickstart_runs_end_to_end() {
    let dir = common::fixtures::scratch("quickstart");
    let out = dir.join("qs");
    let res = Command::new(env!("CARGO_BIN_EXE_betadpo"))
        .args(["quickstart", "--steps", "40", "--no-baseline", "--quiet", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success(), "{stdout}{}", String::from_utf8_lossy(&res.stderr));
    for regime in ["clean", "mixed", "noise"] {
        let row = stdout.lines().find(|l| l.starts_with(regime)).unwrap_or_else(|| panic!("no {regime} row in:\n{stdout}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        // regime, accuracy before, after (learned), after (fixed: skipped), learned beta, ...
        let beta: f64 = cols[4].parse().unwrap_or_else(|_| panic!("{row}"));
        assert!(beta > 0.0 && beta < 2.0, "{row}");
        assert!(stdout.contains(&format!("infer [{regime}] beta")), "{stdout}");
    }
    for f in ["model.onnx", "run-learned/report.svg", "run-learned/metrics.jsonl", "run-learned/final/params.safetensors", "artifacts/manifest.json"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
}
