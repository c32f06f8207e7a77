//! `fieldgate codec estimate` as a user runs it: the real binary on real files.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn fieldgate(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the fieldgate binary runs");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("--json prints one JSON object")
}

#[test]
fn synthetic_estimate_reports_every_encoding() {
    let output = fieldgate(
        &[
            "codec",
            "estimate",
            "--synthetic",
            "20000",
            "--batch",
            "500",
            "--json",
        ],
        None,
    );
    let estimate = json(&output);
    assert_eq!(estimate["readings"], 20_000);
    assert_eq!(estimate["batches"], 40);
    assert_eq!(estimate["series"], 60);
    let per_reading = |name: &str| estimate[name]["bytes_per_reading"].as_f64().unwrap();
    assert!(per_reading("fieldgate") < per_reading("xor_only"));
    assert!(per_reading("xor_only") < per_reading("json_lines"));
    assert!(per_reading("json_lines") > 50.0);
}

#[test]
fn csv_file_and_json_lines_on_stdin_give_the_same_counts() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("readings.csv");
    let mut text = String::from("device,metric,ts_ms,value\n");
    let mut jsonl = String::new();
    for i in 0..2_500 {
        let ts = 1_700_000_000_000i64 + i * 1_000;
        let value = format!("{:.2}", 20.0 + (i % 17) as f64 * 0.01);
        text += &format!("meter-1,temperature,{ts},{value}\nmeter-2,count,{ts},{i}\n");
        jsonl += &format!(
            "{{\"device\":\"meter-1\",\"metric\":\"temperature\",\"ts_ms\":{ts},\"value\":{value}}}\n\
             {{\"device\":\"meter-2\",\"metric\":\"count\",\"ts_ms\":{ts},\"value\":{i}}}\n"
        );
    }
    std::fs::write(&csv, text).unwrap();
    let from_csv = json(&fieldgate(
        &["codec", "estimate", csv.to_str().unwrap(), "--json"],
        None,
    ));
    let from_stdin = json(&fieldgate(
        &["codec", "estimate", "-", "--json"],
        Some(&jsonl),
    ));
    for estimate in [&from_csv, &from_stdin] {
        assert_eq!(estimate["readings"], 5_000);
        assert_eq!(estimate["series"], 2);
        assert_eq!(estimate["batches"], 5);
    }
    assert_eq!(
        from_csv["fieldgate"]["bytes"],
        from_stdin["fieldgate"]["bytes"]
    );
}

#[test]
fn the_table_is_the_default_output() {
    let output = fieldgate(&["codec", "estimate", "--synthetic", "3000"], None);
    assert!(output.status.success());
    let table = String::from_utf8(output.stdout).unwrap();
    for row in [
        "readings   3,000",
        "fieldgate batch",
        "xor-only batch",
        "JSON lines",
    ] {
        assert!(table.contains(row), "{row:?} missing from\n{table}");
    }
}

#[test]
fn bad_input_names_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bad.csv");
    std::fs::write(
        &csv,
        "device,metric,ts_ms,value\nd1,t,1,20.5\nd1,t,2,2O.5\n",
    )
    .unwrap();
    let output = fieldgate(&["codec", "estimate", csv.to_str().unwrap()], None);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:3: bad number \"2O.5\"", csv.display())),
        "{stderr}"
    );

    let output = fieldgate(&["codec", "estimate", "/nonexistent/x.csv"], None);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot open /nonexistent/x.csv"));

    let output = fieldgate(&["codec", "estimate", "-"], Some(""));
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no readings"));
}
