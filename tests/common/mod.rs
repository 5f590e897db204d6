//! Helpers the real-process test files share (each includes this as `mod common;`): timeouts
//! and polling, child processes, and the wire protocol spoken by hand (docs/PROTOCOL.md).

#![allow(dead_code)] // Each test file uses its own subset.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A fresh abstract unix address, unique to this process and call: `unix:@<what>-<pid>-<n>`.
pub fn fresh_addr(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "unix:@{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `body` on a thread and fails the test if it takes longer than `limit`. A panic in the
/// body fails the test with the body's own message.
pub fn with_timeout<T: Send + 'static>(
    limit: Duration,
    body: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, wait) = mpsc::channel();
    let worker = thread::spawn(move || {
        let out = body();
        let _ = done.send(());
        out
    });
    match wait.recv_timeout(limit) {
        Ok(()) => worker.join().expect("test body panicked"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Ok(_) => unreachable!("the body reports completion before it returns"),
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test timed out after {limit:?}"),
    }
}

/// Polls `f` until it returns true or `limit` passes; returns whether it did.
pub fn eventually(limit: Duration, f: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    f()
}

/// Open fds of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// A command that re-executes this test binary to run only its `child_entry` test, as `role`
/// and told `addr`: the environment variables `{prefix}_CHILD` and `{prefix}_ADDR`, which
/// [`child_role`] reads back there. Its stdin is closed, its stdout (the harness chatter,
/// "running 1 test") is dropped and its stderr (its panics) is the test's.
pub fn child_command(prefix: &str, role: &str, addr: &str) -> Command {
    let exe = std::env::current_exe().expect("path of the test binary");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(format!("{prefix}_CHILD"), role)
        .env(format!("{prefix}_ADDR"), addr)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

/// In `child_entry`: the role and address that [`child_command`] gave this process (`None`
/// when the binary runs its tests normally), with a watchdog that ends the process (exit code
/// 3) after `limit`, in case its parent vanished.
pub fn child_role(prefix: &str, limit: Duration) -> Option<(String, String)> {
    let role = std::env::var(format!("{prefix}_CHILD")).ok()?;
    let addr_var = format!("{prefix}_ADDR");
    let addr = std::env::var(&addr_var).expect(&addr_var);
    thread::spawn(move || {
        thread::sleep(limit);
        eprintln!("child watchdog fired");
        std::process::exit(3);
    });
    Some((role, addr))
}

/// Kills and reaps the child when dropped, whether the test passed or not.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The wire, spoken by hand (docs/PROTOCOL.md)
// ---------------------------------------------------------------------------------------------

/// Frame kinds (section 4).
pub const OPEN: u8 = 1;
pub const DATA: u8 = 2;
pub const CLOSE: u8 = 3;
pub const RESET: u8 = 4;
pub const CREDIT: u8 = 5;
pub const PING: u8 = 6;
pub const PONG: u8 = 7;
pub const GOAWAY: u8 = 8;

/// The reference limits (section 3).
pub const MAX_FRAME: u32 = 16 * 1024 * 1024 + 64 * 1024;
pub const MAX_MESSAGE: u32 = 16 * 1024 * 1024;
pub const WINDOW: u32 = 256 * 1024;
pub const MAX_CHANNELS: u32 = 65_536;

/// A 32-byte hello (section 3), field by field, so that a test can break any one of them.
pub struct Hello {
    pub magic: [u8; 4],
    pub version: u16,
    pub features: u64,
    pub max_frame: u32,
    pub max_message: u32,
    pub window: u32,
    pub max_channels: u32,
}

impl Hello {
    /// The reference defaults, with the FDS feature: a peer on a unix socket.
    pub fn good() -> Self {
        Hello {
            magic: *b"LCHN",
            version: 1,
            features: 1,
            max_frame: MAX_FRAME,
            max_message: MAX_MESSAGE,
            window: WINDOW,
            max_channels: MAX_CHANNELS,
        }
    }

    /// The reference defaults without any feature: a peer on a network link.
    pub fn network() -> Self {
        Hello {
            features: 0,
            ..Hello::good()
        }
    }

    pub fn bytes(&self) -> [u8; 32] {
        let mut h = [0u8; 32];
        h[0..4].copy_from_slice(&self.magic);
        h[4..6].copy_from_slice(&self.version.to_le_bytes());
        h[8..16].copy_from_slice(&self.features.to_le_bytes());
        h[16..20].copy_from_slice(&self.max_frame.to_le_bytes());
        h[20..24].copy_from_slice(&self.max_message.to_le_bytes());
        h[24..28].copy_from_slice(&self.window.to_le_bytes());
        h[28..32].copy_from_slice(&self.max_channels.to_le_bytes());
        h
    }
}

/// Reads libchan's hello from `raw` and checks its magic.
pub fn read_hello(raw: &mut impl Read) {
    let mut theirs = [0u8; 32];
    raw.read_exact(&mut theirs).expect("libchan's hello");
    assert_eq!(&theirs[..4], b"LCHN", "libchan's hello");
}

/// A 16-byte frame header (section 4) announcing a body of `len` bytes.
pub fn header(len: u32, kind: u8, nfds: u16, chan: u32, arg: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(16);
    f.extend_from_slice(&len.to_le_bytes());
    f.push(kind);
    f.push(0);
    f.extend_from_slice(&nfds.to_le_bytes());
    f.extend_from_slice(&chan.to_le_bytes());
    f.extend_from_slice(&arg.to_le_bytes());
    f
}

/// A whole frame: its header, then `body`.
pub fn frame(kind: u8, nfds: u16, chan: u32, arg: u32, body: &[u8]) -> Vec<u8> {
    let mut f = header(body.len() as u32, kind, nfds, chan, arg);
    f.extend_from_slice(body);
    f
}

/// An OPEN frame for channel `chan` carrying messages of type `T`.
pub fn open<T: libchan::Message>(chan: u32) -> Vec<u8> {
    frame(OPEN, 0, chan, 0, &libchan::fingerprint::<T>().to_le_bytes())
}

/// The fields of a frame header, read back from its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The body's length.
    pub len: usize,
    pub kind: u8,
    pub chan: u32,
    pub arg: u32,
}

impl Header {
    /// The header at the start of `bytes`, if all 16 of its bytes are there.
    pub fn parse(bytes: &[u8]) -> Option<Header> {
        let h: &[u8; 16] = bytes.get(..16)?.try_into().ok()?;
        let word = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        Some(Header {
            len: word(0) as usize,
            kind: h[4],
            chan: word(8),
            arg: word(12),
        })
    }
}
