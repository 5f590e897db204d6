//! The README's demo (`examples/workers.rs`), run briefly: its exit status, its table, and the
//! processes it leaves (none), also when it is interrupted: Ctrl-C at a terminal (SIGINT to the
//! whole process group), `kill -INT` of the coordinator alone, and SIGKILL of the coordinator.
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
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
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

/// A running demo, in a process group of its own as a terminal would start it. Dropping it
/// kills whatever is left of it (the coordinator's group and each worker, which run in groups
/// of their own), so that a failing test leaves nothing behind.
struct Demo {
    child: Child,
    out: BufReader<ChildStdout>,
    /// What the demo wrote to stderr so far (the progress bar), read by a thread.
    err: Arc<Mutex<String>>,
    err_reader: Option<JoinHandle<()>>,
    /// The workers' pids, as the demo announced them.
    pids: Vec<i32>,
}

impl Demo {
    /// Starts the demo with `args` and reads its stdout until it has announced `workers`
    /// workers.
    fn start(args: &[&str], workers: usize) -> Demo {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(demo())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start the demo");
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut stderr = child.stderr.take().unwrap();
        let err = Arc::new(Mutex::new(String::new()));
        let sink = err.clone();
        let err_reader = thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut demo = Demo {
            child,
            out,
            err,
            err_reader: Some(err_reader),
            pids: Vec::new(),
        };
        demo.read_worker_pids(workers);
        demo
    }

    /// Reads lines from stdout until `n` workers are announced; keeps their pids.
    fn read_worker_pids(&mut self, n: usize) {
        let mut line = String::new();
        while self.pids.len() < n {
            line.clear();
            assert!(
                self.out.read_line(&mut line).unwrap() > 0,
                "the demo ended early"
            );
            // "worker   0: pid 1234, cpu 0, shm"
            if let Some(rest) = line.split_once(": pid ").map(|(_, r)| r) {
                let pid = rest.split(',').next().unwrap().trim().parse().unwrap();
                self.pids.push(pid);
            }
        }
    }

    /// The number of jobs the progress bar last showed.
    fn jobs_shown(&self) -> u64 {
        jobs_in_progress(&self.err.lock().unwrap())
    }

    /// Waits until the progress bar shows jobs done, so that an interruption comes mid-run.
    fn wait_for_jobs(&self) -> u64 {
        let start = Instant::now();
        while self.jobs_shown() == 0 {
            assert!(
                start.elapsed() < PATIENCE,
                "no job done within {PATIENCE:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        self.jobs_shown()
    }

    /// Waits for the demo to exit (killing it after `PATIENCE`); returns its status, the rest
    /// of its stdout and all of its stderr.
    fn finish(&mut self) -> (ExitStatus, String, String) {
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "the demo did not exit within {PATIENCE:?}"
            );
            thread::sleep(Duration::from_millis(20));
        };
        if let Some(reader) = self.err_reader.take() {
            reader.join().unwrap();
        }
        let err = self.err.lock().unwrap().clone();
        (status, rest, err)
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32).unwrap()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = rustix::process::kill_process_group(self.pid(), Signal::KILL);
            let _ = self.child.wait();
        }
        for &pid in self.pids.iter().filter(|&&p| running(p)) {
            let _ = rustix::process::kill_process(Pid::from_raw(pid).unwrap(), Signal::KILL);
        }
    }
}

/// The largest job count in the progress bar's updates ("[###   ]  10%  8307 jobs ").
fn jobs_in_progress(err: &str) -> u64 {
    err.split('\r')
        .filter_map(|update| update.split_whitespace().rev().nth(1)?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The rows of the demo's table, split into columns: name, cpu, transport, jobs, MB/s, p50,
/// p99, messages heard from the ring.
fn table(out: &str) -> Vec<Vec<&str>> {
    let mut lines = out
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("worker  cpu"));
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("no table in:\n{out}"));
    assert!(
        header.contains("transport") && header.contains("p99"),
        "{header}"
    );
    let rows: Vec<Vec<&str>> = lines
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    let names: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(names, ["0", "1", "tcp"], "{out}");
    for row in &rows {
        assert_eq!(row.len(), 8, "{row:?}");
        let expected = if row[0] == "tcp" { "tcp" } else { "shm" };
        assert_eq!(row[2], expected, "{row:?}");
        if row[0] != "tcp" {
            assert!(
                row[1].parse::<usize>().is_ok(),
                "worker {} not pinned",
                row[0]
            );
        }
    }
    rows
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

/// Two pinned workers and the TCP worker for two seconds: exit status 0, a progress bar, a
/// table with one row per worker, each with jobs done (and, for the two workers of the ring,
/// messages heard from the other), and every worker gone.
#[test]
fn demo_runs_and_prints_its_table() {
    with_timeout(Duration::from_secs(300), || {
        let exe = demo(); // the build may take a while; the run itself is short
        let mut demo = Demo::start(&["--workers", "2", "--duration", "2", "--size", "512"], 3);
        let (status, rest, err) = demo.finish();
        assert!(status.success(), "{exe:?} failed: {status}\n{rest}\n{err}");
        assert!(
            err.contains("\r[") && err.contains("100%"),
            "no progress bar: {err:?}"
        );
        assert!(!rest.contains("interrupted"), "{rest}");
        for row in table(&rest) {
            let jobs: u64 = row[3].parse().unwrap();
            assert!(jobs > 0, "worker {} did no job: {row:?}", row[0]);
            let heard: u64 = row[7].parse().unwrap();
            if row[0] != "tcp" {
                assert!(
                    heard > 0,
                    "worker {} heard nothing in the ring: {row:?}",
                    row[0]
                );
            }
        }
        assert!(rest.contains("all 3 workers exited cleanly"), "{rest}");
        assert!(
            all_gone(&demo.pids, PATIENCE),
            "workers left behind: {:?}",
            demo.pids
        );
    });
}

/// Interrupts a 60-second run once jobs flow, with SIGINT to the demo's process group (as
/// Ctrl-C at a terminal does) or to the coordinator alone (as `kill -INT` does): either way the
/// coordinator shuts its workers down, prints the table of what ran, and exits 0, leaving no
/// process behind.
fn interrupt(whole_group: bool) {
    demo();
    let mut demo = Demo::start(&["--workers", "2", "--duration", "60"], 3);
    let seen = demo.wait_for_jobs();
    if whole_group {
        rustix::process::kill_process_group(demo.pid(), Signal::INT).unwrap();
    } else {
        rustix::process::kill_process(demo.pid(), Signal::INT).unwrap();
    }
    let (status, rest, err) = demo.finish();
    assert!(
        status.success(),
        "interrupted demo failed: {status}\n{rest}\n{err}"
    );
    assert!(rest.contains("interrupted by Ctrl-C"), "{rest}");
    assert!(!err.contains("100%"), "the run was not cut short: {err:?}");
    let jobs: u64 = table(&rest)
        .iter()
        .map(|r| r[3].parse::<u64>().unwrap())
        .sum();
    assert!(
        jobs >= seen,
        "the table shows {jobs} jobs, the progress bar {seen}\n{rest}"
    );
    // Each driver reaps its worker before the table is printed.
    assert!(rest.contains("all 3 workers exited cleanly"), "{rest}");
    assert!(
        all_gone(&demo.pids, PATIENCE),
        "workers left behind: {:?}",
        demo.pids
    );
}

/// Ctrl-C at a terminal signals the demo's whole process group: a clean shutdown, exit 0.
#[test]
fn ctrl_c_stops_cleanly_and_leaves_no_process_behind() {
    with_timeout(Duration::from_secs(300), || interrupt(true));
}

/// SIGINT to the coordinator alone: the same clean shutdown, which therefore does not rely on
/// the workers getting the signal too.
#[test]
fn sigint_to_the_coordinator_alone_stops_cleanly() {
    with_timeout(Duration::from_secs(300), || interrupt(false));
}

/// When the coordinator dies without a chance to shut down (SIGKILL), every worker sees its
/// session end and exits by itself.
#[test]
fn workers_exit_when_the_coordinator_is_killed() {
    with_timeout(Duration::from_secs(300), || {
        demo();
        let mut demo = Demo::start(&["--workers", "2", "--duration", "60"], 3);
        demo.wait_for_jobs();
        rustix::process::kill_process(demo.pid(), Signal::KILL).unwrap();
        let (status, _, _) = demo.finish();
        assert!(!status.success(), "the demo survived SIGKILL: {status}");
        assert!(
            all_gone(&demo.pids, PATIENCE),
            "workers outlived their coordinator: {:?}",
            demo.pids
        );
    });
}
