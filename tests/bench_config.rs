//! `bench --devices ... --config FILE` reads the engine settings from the `[engine]` table of
//! the TOML file `serve --config` reads (docs/DESIGN.md section 10.2), or from a `.json` file
//! holding the engine settings alone; a bad value there is reported, naming the setting.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_fusion-engine");

fn bench(config: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args([
            "bench",
            "--devices",
            "cpu:threads=1",
            "--samples",
            "512",
            "--batch",
            "64",
        ])
        .args(["--json", "--config"])
        .arg(config)
        .output()
        .expect("fusion-engine runs")
}

#[test]
fn bench_reads_the_engine_table_of_the_serve_config() {
    let dir = tempfile::tempdir().unwrap();
    // The server's settings are in the same file and are ignored by bench.
    let good = dir.path().join("serve.toml");
    std::fs::write(
        &good,
        "align_timeout = \"20ms\"\n[send_queue]\nbulk = 10\n[engine]\nmax_in_flight = 2\n",
    )
    .unwrap();
    let out = bench(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(report["delivered"], 512, "{report}");

    // A bad value in the [engine] table is the engine's error, naming the setting.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[engine]\nmax_in_flight = 0\n").unwrap();
    let out = bench(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_in_flight"), "{err}");

    // An unknown engine setting is refused, not ignored.
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[engine]\nmax_in_flite = 2\n").unwrap();
    let out = bench(&unknown);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_in_flite"));

    // The documented alternative: the engine settings alone, in JSON.
    let json = dir.path().join("engine.json");
    std::fs::write(&json, "{\"max_in_flight\": 0}").unwrap();
    let out = bench(&json);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_in_flight"));
}
