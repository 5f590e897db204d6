//! `libchan::spawn` and `libchan::parent`: worker processes connected to their parent by a
//! session in one call.
//!
//! The test binary re-executes itself as the workers: `LIBCHAN_SPAWN_ROLE` names what the
//! child does, and `worker_entry` is a no-op in the parent run. Every child gives up after
//! `CHILD_WATCHDOG`. The tests take one lock each, so that the descriptor counts of one are
//! not disturbed by another.

mod common;

use common::{eventually, fd_count, with_timeout};

use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use libchan::{Error, Options, SpawnOptions, Transport};

/// A child gives up after this long whatever it is doing.
const CHILD_WATCHDOG: Duration = Duration::from_secs(30);

/// Generous bound on any single wait in these tests.
const PATIENCE: Duration = Duration::from_secs(10);

const ROLE: &str = "LIBCHAN_SPAWN_ROLE";

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// This test binary, to run as a child in `role`.
fn worker(role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("path of the test binary"));
    cmd.args(["--exact", "worker_entry", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

/// Sends `n` numbers to an echo worker and checks that each comes back plus one.
fn echo_round_trips(session: &libchan::Session, n: u64) {
    let numbers = session.open_channel::<u64>().unwrap();
    let answers = session.accept_channel_timeout::<u64>(PATIENCE).unwrap();
    for i in 0..n {
        numbers.send(i).unwrap();
        let answer = answers.recv_timeout(PATIENCE).unwrap();
        assert_eq!(answer.to_native(), i + 1);
    }
}

/// The handshake error of a failed spawn, or a failure naming what came instead.
fn handshake_error(result: Result<(std::process::Child, libchan::Session), Error>) -> String {
    match result {
        Err(Error::Handshake(msg)) => msg,
        Err(e) => panic!("expected a handshake error, got {e:?}"),
        Ok((mut child, _)) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("spawn succeeded with a process that is not a worker")
        }
    }
}

/// The parent's pid of process `pid`, if it still exists.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    let set = rustix::thread::sched_getaffinity(None).unwrap();
    (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect()
}

/// A spawned worker answers over its session, which runs on shared memory (same uid), and
/// exits successfully once the parent closes the channel.
#[test]
fn round_trip_over_a_spawned_session() {
    let _serial = serial();
    with_timeout(Duration::from_secs(30), || {
        let (mut child, session) = libchan::spawn(worker("echo")).unwrap();
        assert_eq!(session.transport(), Transport::Shm);
        echo_round_trips(&session, 1000);
        drop(session);
        // Closing the numbers channel (dropped in `echo_round_trips`) ends the worker's loop.
        assert!(child.wait().unwrap().success());
    });
}

/// The session options of `SpawnOptions` apply to the parent's side: without shared memory
/// the session stays on the socket, and still works.
#[test]
fn session_options_apply_to_the_parent_side() {
    let _serial = serial();
    with_timeout(Duration::from_secs(30), || {
        let opts = SpawnOptions::new().session(Options::new().shm(false));
        let (mut child, session) = libchan::spawn_with(worker("echo"), &opts).unwrap();
        assert_eq!(session.transport(), Transport::Unix);
        echo_round_trips(&session, 100);
        assert!(child.wait().unwrap().success());
    });
}

/// A worker pinned to a core runs there, and only there: both the kernel's view
/// (`Cpus_allowed_list`) and `sched_getaffinity` in the child say so.
#[test]
fn pinned_worker_runs_on_its_core() {
    let _serial = serial();
    with_timeout(Duration::from_secs(30), || {
        // The last CPU this process may use: never CPU 0 alone by accident on a larger box.
        let core = *allowed_cpus().last().unwrap();
        let opts = SpawnOptions::new().core(core);
        let (mut child, session) = libchan::spawn_with(worker("affinity"), &opts).unwrap();
        let reports = session.accept_channel_timeout::<String>(PATIENCE).unwrap();
        let report = reports.recv_timeout(PATIENCE).unwrap();
        assert_eq!(report.as_str(), format!("status={core} sched={core}"));
        drop((report, reports, session)); // the worker waits for the session to end
        assert!(child.wait().unwrap().success());
    });
}

/// A CPU number past the kernel's limit fails before anything starts; a CPU that does not
/// exist fails when the child is pinned, with a message that says so.
#[test]
fn pinning_to_a_missing_core_is_an_error() {
    let _serial = serial();
    with_timeout(Duration::from_secs(30), || {
        let opts = SpawnOptions::new().core(1 << 20);
        match libchan::spawn_with(worker("echo"), &opts) {
            Err(Error::Io(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
                assert!(e.to_string().contains("CPU 1048576"), "{e}");
            }
            other => panic!("expected an i/o error, got {:?}", other.map(|_| ())),
        }
        let missing = rustix::thread::CpuSet::MAX_CPU - 1;
        if allowed_cpus().contains(&missing) {
            return; // A machine with that many CPUs: nothing to test here.
        }
        let opts = SpawnOptions::new().core(missing);
        match libchan::spawn_with(worker("echo"), &opts) {
            Err(Error::Io(e)) => {
                assert!(e.to_string().contains("cannot pin"), "{e}");
            }
            other => panic!("expected an i/o error, got {:?}", other.map(|_| ())),
        }
    });
}

/// A program that is not a libchan worker and exits is reported at once, with its exit
/// status, long before the handshake timeout.
#[test]
fn a_program_that_exits_is_not_a_worker() {
    let _serial = serial();
    with_timeout(Duration::from_secs(30), || {
        let opts = SpawnOptions::new().timeout(Duration::from_secs(120));
        let msg = handshake_error(libchan::spawn_with(Command::new("true"), &opts));
        assert!(msg.contains("exit status: 0"), "{msg}");
        assert!(msg.contains("before it called libchan::parent()"), "{msg}");
        let msg = handshake_error(libchan::spawn_with(Command::new("false"), &opts));
        assert!(msg.contains("exit status: 1"), "{msg}");
        // Our own test binary without a role exits too, having called nothing.
        let msg = handshake_error(libchan::spawn_with(worker("none"), &opts));
        assert!(msg.contains("exit status: 0"), "{msg}");
    });
}

/// A program that stays silent is killed and reaped after the timeout, and the error says so.
#[test]
fn a_silent_child_is_killed_after_the_timeout() {
    let _serial = serial();
    with_timeout(Duration::from_secs(30), || {
        let opts = SpawnOptions::new().timeout(Duration::from_millis(300));
        let msg = handshake_error(libchan::spawn_with(worker("silent"), &opts));
        assert!(
            msg.contains("did not call libchan::parent() within 300ms"),
            "{msg}"
        );
        assert!(msg.contains("killed"), "{msg}");
        let pid: u32 = msg
            .split_whitespace()
            .nth(2)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {msg:?}"));
        // Reaped: the process is gone (not a zombie of ours).
        assert_ne!(parent_of(pid), Some(std::process::id()), "child {pid} left");
    });
}

/// A program that cannot be started is an i/o error.
#[test]
fn a_missing_program_is_an_io_error() {
    let _serial = serial();
    match libchan::spawn(Command::new("/nonexistent/libchan-worker")) {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
        other => panic!("expected an i/o error, got {:?}", other.map(|_| ())),
    }
}

/// `parent()` in a process that `spawn` did not start is an error that says so.
#[test]
fn parent_without_spawn_is_an_error() {
    let _serial = serial();
    assert!(!libchan::is_worker());
    match libchan::parent() {
        Err(Error::Address(msg)) => {
            assert!(msg.contains("not started by libchan::spawn"), "{msg}")
        }
        other => panic!("expected an address error, got {other:?}"),
    }
}

/// A variable that names no socket of ours (forged, or inherited by a grandchild without the
/// socket) is refused without touching the descriptor it names.
#[test]
fn a_variable_without_its_socket_is_refused() {
    let _serial = serial();
    with_timeout(Duration::from_secs(30), || {
        for forged in ["1:5", "x", "7:1", "1000000:1"] {
            let status = worker("orphan")
                .env("LIBCHAN_PARENT_FD", forged)
                .status()
                .unwrap();
            assert!(status.success(), "LIBCHAN_PARENT_FD={forged}: {status}");
        }
        // A worker's own child inherits the variable, but not the socket.
        let (mut child, session) = libchan::spawn(worker("grandparent")).unwrap();
        let reports = session.accept_channel_timeout::<bool>(PATIENCE).unwrap();
        assert!(
            *reports.recv_timeout(PATIENCE).unwrap(),
            "the grandchild took a socket"
        );
        drop((reports, session));
        assert!(child.wait().unwrap().success());
    });
}

/// The socket can be taken once; `is_worker` stays true afterwards.
#[test]
fn parent_can_be_called_only_once() {
    let _serial = serial();
    with_timeout(Duration::from_secs(30), || {
        let (mut child, session) = libchan::spawn(worker("twice")).unwrap();
        let reports = session.accept_channel_timeout::<String>(PATIENCE).unwrap();
        let report = reports.recv_timeout(PATIENCE).unwrap();
        assert!(report.starts_with("worker=true "), "{}", report.as_str());
        assert!(report.contains("already called"), "{}", report.as_str());
        drop((report, reports, session));
        assert!(child.wait().unwrap().success());
    });
}

/// Spawning leaves no descriptor behind in the parent, and a worker inherits only its own
/// socket: not those of the workers started before it.
#[test]
fn spawning_leaks_no_descriptors() {
    let _serial = serial();
    with_timeout(Duration::from_secs(60), || {
        // Warm up whatever the first session allocates once per process.
        let (mut child, session) = libchan::spawn(worker("echo")).unwrap();
        echo_round_trips(&session, 10);
        drop(session);
        assert!(child.wait().unwrap().success());

        let before = fd_count();
        for _ in 0..5 {
            let (mut child, session) = libchan::spawn(worker("echo")).unwrap();
            echo_round_trips(&session, 10);
            drop(session);
            assert!(child.wait().unwrap().success());
            // Failed spawns leak nothing either.
            let opts = SpawnOptions::new().timeout(Duration::from_millis(100));
            let _ = handshake_error(libchan::spawn_with(Command::new("true"), &opts));
            let _ = handshake_error(libchan::spawn_with(worker("silent"), &opts));
        }
        assert!(
            eventually(PATIENCE, || fd_count() <= before),
            "descriptors: {before} before, {} after",
            fd_count()
        );

        // An earlier worker is alive, with its session: the next one sees one socket only.
        let (mut first, first_session) = libchan::spawn(worker("echo")).unwrap();
        let (mut second, session) = libchan::spawn(worker("sockets")).unwrap();
        let reports = session.accept_channel_timeout::<u64>(PATIENCE).unwrap();
        assert_eq!(reports.recv_timeout(PATIENCE).unwrap().to_native(), 1);
        drop((reports, session));
        assert!(second.wait().unwrap().success());
        echo_round_trips(&first_session, 1);
        assert!(first.wait().unwrap().success());
    });
}

// ---------------------------------------------------------------------------------------------
// The child side
// ---------------------------------------------------------------------------------------------

/// The child's entry point; does nothing in the parent run.
#[test]
fn worker_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    thread::spawn(|| {
        thread::sleep(CHILD_WATCHDOG);
        std::process::exit(3);
    });
    match role.as_str() {
        "echo" => {
            let session = libchan::parent().unwrap();
            let numbers = session.accept_channel_timeout::<u64>(PATIENCE).unwrap();
            let answers = session.open_channel::<u64>().unwrap();
            for n in numbers.iter() {
                answers.send(n.to_native() + 1).unwrap();
            }
        }
        "affinity" => {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let listed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_string();
            let sched: Vec<String> = allowed_cpus().iter().map(|c| c.to_string()).collect();
            let session = libchan::parent().unwrap();
            let reports = session.open_channel::<String>().unwrap();
            reports
                .send(format!("status={listed} sched={}", sched.join(",")))
                .unwrap();
            // Stay until the parent has read the report and dropped its session.
            let _ = session.accept_channel::<u8>();
        }
        "none" => {}
        "silent" => thread::sleep(CHILD_WATCHDOG),
        "orphan" => {
            assert!(!libchan::is_worker());
            match libchan::parent() {
                Err(Error::Address(msg)) => {
                    assert!(msg.contains("not started by libchan::spawn"), "{msg}")
                }
                other => panic!("expected an address error, got {other:?}"),
            }
        }
        "grandparent" => {
            let session = libchan::parent().unwrap();
            let status = worker("orphan").status().unwrap();
            let reports = session.open_channel::<bool>().unwrap();
            reports.send(status.success()).unwrap();
            let _ = session.accept_channel::<u8>();
        }
        "twice" => {
            let session = libchan::parent().unwrap();
            let again = match libchan::parent() {
                Err(e) => e.to_string(),
                Ok(_) => "a second session".to_string(),
            };
            let reports = session.open_channel::<String>().unwrap();
            reports
                .send(format!("worker={} {again}", libchan::is_worker()))
                .unwrap();
            let _ = session.accept_channel::<u8>();
        }
        "sockets" => {
            let sockets = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("socket:"))
                .count();
            let session = libchan::parent().unwrap();
            let reports = session.open_channel::<u64>().unwrap();
            reports.send(sockets as u64).unwrap();
            let _ = session.accept_channel::<u8>();
        }
        other => panic!("unknown role {other}"),
    }
}
