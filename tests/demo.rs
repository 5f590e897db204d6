//! The README's demo (`examples/workers.rs`), run briefly: its exit status, its table, and the
//! processes it leaves (none), also when it is interrupted.
//!
//! Cargo gives tests the path of the package's binaries, not of its examples, and builds
//! examples for `cargo test` only when every target is selected; an example it did build may
//! also be stale when a single test is selected. So the test asks cargo itself to build the
//! example (`cargo build --example workers`, with the profile of this test binary and
//! `--all-features` as the README's test command uses: a no-op when `cargo test --all-features`
//! has just built it) and takes the executable's path from cargo's JSON messages. Cargo holds
//! no lock while tests run, so the nested build does not wait for this one.

mod common;

use common::with_timeout;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// Generous bound on waiting for a process to start, print or exit.
const PATIENCE: Duration = Duration::from_secs(30);

/// The demo's executable, built (once per test binary) by cargo.
fn demo() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        // This binary is target/<profile dir>/deps/demo-<hash>.
        let me = std::env::current_exe().expect("path of the test binary");
        let profile = match me
            .parent()
            .and_then(|d| d.parent())
            .and_then(|d| d.file_name())
        {
            Some(dir) if dir == "debug" => "dev".to_string(),
            Some(dir) => dir.to_string_lossy().into_owned(),
            None => "dev".to_string(),
        };
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let out = Command::new(env!("CARGO"))
            .args(["build", "--example", "workers", "--all-features"])
            .args(["--profile", &profile, "--manifest-path", manifest])
            .args(["--message-format", "json-render-diagnostics"])
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo");
        assert!(out.status.success(), "cargo build --example workers failed");
        let json = String::from_utf8_lossy(&out.stdout);
        let exe = json
            .lines()
            .filter(|l| l.contains(r#""reason":"compiler-artifact""#))
            .filter(|l| l.contains(r#""kind":["example"]"#) && l.contains(r#""name":"workers""#))
            .find_map(|l| l.split(r#""executable":""#).nth(1)?.split('"').next())
            .unwrap_or_else(|| panic!("no executable in cargo's messages:\n{json}"));
        PathBuf::from(exe)
    })
}

/// Starts the demo with `args`, stdout piped, stderr piped, in a process group of its own.
fn start(args: &[&str]) -> Child {
    use std::os::unix::process::CommandExt;
    Command::new(demo())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start the demo")
}

/// Reads lines from the demo's stdout until it has announced `n` workers; returns their pids.
fn worker_pids(out: &mut BufReader<ChildStdout>, n: usize) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut line = String::new();
    while pids.len() < n {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the demo ended early"
        );
        // "worker   0: pid 1234, cpu 0, shm"
        if let Some(rest) = line.split_once(": pid ").map(|(_, r)| r) {
            pids.push(rest.split(',').next().unwrap().trim().parse().unwrap());
        }
    }
    pids
}

/// True while `pid` runs (a zombie no longer does).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn all_gone(pids: &[i32], limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !pids.iter().any(|&p| running(p)) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Waits for `child` at most `limit`, then kills it (so a failing test leaves nothing).
fn wait_or_kill(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let pid = Pid::from_raw(child.id() as i32).unwrap();
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
            let _ = child.wait();
            panic!("the demo did not exit within {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Two pinned workers and the TCP worker for two seconds: exit status 0, a progress bar, a
/// table with one row per worker, each with jobs done (and, for the two workers of the ring,
/// messages heard from the other), and every worker gone.
#[test]
fn demo_runs_and_prints_its_table() {
    with_timeout(Duration::from_secs(300), || {
        let exe = demo(); // the build may take a while; the run itself is short
        let mut child = start(&["--workers", "2", "--duration", "2", "--size", "512"]);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let pids = worker_pids(&mut out, 3);
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = wait_or_kill(&mut child, PATIENCE);
        assert!(status.success(), "{exe:?} failed: {status}\n{rest}\n{err}");
        assert!(
            err.contains("\r[") && err.contains("100%"),
            "no progress bar: {err:?}"
        );

        let mut lines = rest
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("worker  cpu"));
        let header = lines
            .next()
            .unwrap_or_else(|| panic!("no table in:\n{rest}"));
        assert!(
            header.contains("transport") && header.contains("p99"),
            "{header}"
        );
        let rows: Vec<Vec<&str>> = lines
            .take_while(|l| !l.trim().is_empty())
            .map(|l| l.split_whitespace().collect())
            .collect();
        let names: Vec<&str> = rows.iter().map(|r| r[0]).collect();
        assert_eq!(names, ["0", "1", "tcp"], "{rest}");
        for row in &rows {
            // name, cpu, transport, jobs, MB/s, p50, p99, heard from the ring
            assert_eq!(row.len(), 8, "{row:?}");
            let jobs: u64 = row[3].parse().unwrap();
            assert!(jobs > 0, "worker {} did no job: {row:?}", row[0]);
            let heard: u64 = row[7].parse().unwrap();
            if row[0] == "tcp" {
                assert_eq!(row[2], "tcp", "{row:?}");
            } else {
                assert_eq!(row[2], "shm", "{row:?}");
                assert!(
                    heard > 0,
                    "worker {} heard nothing in the ring: {row:?}",
                    row[0]
                );
                assert!(
                    row[1].parse::<usize>().is_ok(),
                    "worker {} not pinned",
                    row[0]
                );
            }
        }
        assert!(rest.contains("all 3 workers exited cleanly"), "{rest}");
        assert!(all_gone(&pids, PATIENCE), "workers left behind: {pids:?}");
    });
}

/// Ctrl-C at a terminal signals the demo's whole process group: coordinator and workers stop,
/// none is left.
#[test]
fn ctrl_c_leaves_no_process_behind() {
    with_timeout(Duration::from_secs(300), || {
        demo();
        let mut child = start(&["--workers", "2", "--duration", "60"]);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let pids = worker_pids(&mut out, 3);
        thread::sleep(Duration::from_millis(500)); // let jobs flow
        let group = Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process_group(group, Signal::INT).unwrap();
        let status = wait_or_kill(&mut child, PATIENCE);
        assert!(!status.success(), "the demo ignored SIGINT: {status}");
        assert!(all_gone(&pids, PATIENCE), "workers left behind: {pids:?}");
    });
}

/// When the coordinator alone dies (SIGINT to its pid only, as `kill -INT` does), every worker
/// sees its session end and exits by itself.
#[test]
fn workers_exit_when_the_coordinator_dies() {
    with_timeout(Duration::from_secs(300), || {
        demo();
        let mut child = start(&["--workers", "2", "--duration", "60"]);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let pids = worker_pids(&mut out, 3);
        thread::sleep(Duration::from_millis(500));
        let coordinator = Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(coordinator, Signal::INT).unwrap();
        let status = wait_or_kill(&mut child, PATIENCE);
        assert!(!status.success(), "the demo ignored SIGINT: {status}");
        let left = all_gone(&pids, PATIENCE);
        if !left {
            let _ = rustix::process::kill_process_group(coordinator, Signal::KILL);
        }
        assert!(left, "workers outlived their coordinator: {pids:?}");
    });
}
