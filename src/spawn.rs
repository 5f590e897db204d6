//! Worker processes connected to their parent by a session, started in one call.
//!
//! [`spawn`] makes a unix socket pair, starts the child with one end inherited, and runs the
//! handshake on the other end while the child starts; the child calls [`parent`] to run its
//! side. The socket is the same one [`Session::pair`] would make, so a same-uid child talks to
//! its parent over shared memory.
//!
//! How the child finds its end: the environment variable `LIBCHAN_PARENT_FD` holds
//! `FD:INODE`, the descriptor number and the inode of the socket. Only the child gets that
//! descriptor without close-on-exec (a `pre_exec` hook clears the flag between fork and exec);
//! in the parent both ends stay close-on-exec, so no other child inherits them. [`parent`]
//! takes the descriptor only if it is open and is that very socket (checked through
//! `/proc/self/fd`), so a grandchild that inherited the variable but not the socket gets an
//! error, never somebody else's descriptor. The hook and the taking are the two unsafe steps;
//! both live in `sys::process`, behind safe functions.
//!
//! A child that is not a libchan worker never says hello on its socket: [`spawn`] reports
//! [`Error::Handshake`] when the child exits first (with its exit status), or kills and reaps
//! it when it stays silent past [`SpawnOptions::timeout`].

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rustix::thread::CpuSet;

use crate::error::Error;
use crate::sys::{self, Refused};
use crate::transport::{Options, Role, Session};

/// The environment variable that tells a child where its parent's socket is: `FD:INODE`.
const PARENT_FD_VAR: &str = "LIBCHAN_PARENT_FD";

/// How long [`spawn`] waits for the child to call [`parent`], unless told otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often [`spawn`] looks whether a silent child has exited (a child's exit normally shows
/// at once, as the end of its socket; this catches a child whose own children keep it open).
const EXIT_CHECK: Duration = Duration::from_millis(100);

/// How [`spawn_with`] starts a worker.
///
/// ```
/// use std::time::Duration;
/// use libchan::{Options, SpawnOptions};
///
/// let opts = SpawnOptions::new()
///     .core(0)                            // pin the worker to CPU 0
///     .session(Options::new().shm(false)) // keep its session on the socket
///     .timeout(Duration::from_secs(30));  // give it 30 s to call libchan::parent()
/// # let _ = opts;
/// ```
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    core: Option<usize>,
    session: Options,
    timeout: Duration,
}

impl Default for SpawnOptions {
    fn default() -> Self {
        Self {
            core: None,
            session: Options::default(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl SpawnOptions {
    /// The defaults: not pinned, default session [`Options`], 10 s for the child to call
    /// [`parent`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Pins the worker to CPU `core` (its affinity is set before it executes, so every thread
    /// it starts runs there too). By default the worker inherits this process's affinity.
    pub fn core(mut self, core: usize) -> Self {
        self.core = Some(core);
        self
    }

    /// The [`Options`] of the parent's side of the session. The child passes its own to
    /// [`parent_with`]; shared memory needs both sides to allow it.
    pub fn session(mut self, opts: Options) -> Self {
        self.session = opts;
        self
    }

    /// How long the child has to call [`parent`] before [`spawn_with`] kills it and fails.
    /// 10 s by default.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// Starts `cmd` as a worker process connected to this one by a session. The child must call
/// [`parent`] (or [`parent_with`]) to run its side.
///
/// Whatever `cmd` sets (arguments, environment, stdio, working directory) is kept; `spawn`
/// adds the variable `LIBCHAN_PARENT_FD` and an inherited socket. It returns once the
/// handshake is done. The [`Child`] is the caller's to wait for: dropping it neither kills nor
/// reaps the worker. A worker whose parent exits sees its session close ([`Error::Disconnected`]
/// and `RecvError::Disconnected` on its channels).
///
/// The example runs itself as its worker:
///
/// ```
/// use std::process::Command;
///
/// if libchan::is_worker() {
///     // The child: double every number until the parent closes the channel.
///     let parent = libchan::parent()?;
///     let numbers = parent.accept_channel::<u64>()?;
///     let doubled = parent.open_channel::<u64>()?;
///     for n in numbers.iter() {
///         doubled.send(n.to_native() * 2)?;
///     }
///     return Ok(());
/// }
/// let (mut child, session) = libchan::spawn(Command::new(std::env::current_exe()?))?;
/// let numbers = session.open_channel::<u64>()?;
/// let doubled = session.accept_channel::<u64>()?;
/// numbers.send(21)?;
/// assert_eq!(*doubled.recv()?, 42);
/// drop(numbers); // the worker's loop ends, and so does the worker
/// assert!(child.wait()?.success());
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// ```
///
/// # Errors
///
/// - [`Error::Io`] when the process cannot be started (no such program, say) or cannot be
///   pinned to the requested core;
/// - [`Error::Handshake`] when the child is not a libchan worker: it exited before calling
///   [`parent`] (the message gives its exit status), or it did not call it within the
///   timeout (it was then killed and reaped), or the handshake itself failed.
pub fn spawn(cmd: Command) -> Result<(Child, Session), Error> {
    spawn_with(cmd, &SpawnOptions::default())
}

/// [`spawn`] with [`SpawnOptions`]: pinning, session options and the handshake timeout.
///
/// # Errors
///
/// As [`spawn`].
pub fn spawn_with(mut cmd: Command, opts: &SpawnOptions) -> Result<(Child, Session), Error> {
    let cpus = match opts.core {
        Some(core) if core >= CpuSet::MAX_CPU => {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cannot pin a worker to CPU {core}: CPUs are numbered below {}",
                    CpuSet::MAX_CPU
                ),
            )));
        }
        Some(core) => {
            let mut set = CpuSet::new();
            set.set(core);
            Some(set)
        }
        None => None,
    };
    let (ours, theirs) = UnixStream::pair()?;
    // `Command` points descriptors 0-2 at the child's stdio before the hook below runs: keep
    // the child's end above them.
    let theirs = if theirs.as_raw_fd() <= 2 {
        rustix::io::fcntl_dupfd_cloexec(&theirs, 3)?
    } else {
        OwnedFd::from(theirs)
    };
    let inode = rustix::fs::fstat(&theirs)?.st_ino;
    cmd.env(PARENT_FD_VAR, format!("{}:{inode}", theirs.as_raw_fd()));
    sys::inherit_and_pin(&mut cmd, theirs, cpus);
    let spawned = cmd.spawn();
    // The command owns the child's end: dropping it closes that end here, so the child's exit
    // shows as the end of our socket.
    drop(cmd);
    let mut child = spawned.map_err(|e| match (opts.core, e.raw_os_error()) {
        (Some(core), Some(code)) if code == rustix::io::Errno::INVAL.raw_os_error() => {
            Error::Io(io::Error::new(
                e.kind(),
                format!("cannot pin a worker to CPU {core} (offline, or outside this process's cpuset): {e}"),
            ))
        }
        _ => Error::Io(e),
    })?;
    let session = handshake(&mut child, ours, opts)?;
    Ok((child, session))
}

/// Connects to the parent that started this process with [`spawn`], with default [`Options`].
/// Call it once, early: the parent waits for it (10 s by default, see
/// [`SpawnOptions::timeout`]), and until it is called the processes this one starts inherit
/// the parent's socket too.
///
/// See [`spawn`] for an example.
///
/// # Errors
///
/// [`Error::Address`] when this process was not started by [`spawn`] (or its socket was
/// already taken by an earlier call), [`Error::Handshake`] when the handshake fails,
/// [`Error::Io`] when a system call does.
pub fn parent() -> Result<Session, Error> {
    parent_with(&Options::default())
}

/// [`parent`] with [`Options`] for this side of the session.
///
/// # Errors
///
/// As [`parent`].
pub fn parent_with(opts: &Options) -> Result<Session, Error> {
    let (raw, inode) = inherited()?;
    let fd = sys::take_inherited_socket(raw, inode).map_err(|why| refused(raw, why))?;
    // From now on our own children must not inherit it.
    sys::set_cloexec(&fd)?;
    Session::from_unix_stream_with(UnixStream::from(fd), Role::Connector, opts)
}

/// True when this process was started by [`spawn`] and so can call [`parent`] (or already
/// did).
///
/// ```
/// // The test that runs this example was not started by libchan::spawn.
/// assert!(!libchan::is_worker());
/// assert!(libchan::parent().is_err());
/// ```
pub fn is_worker() -> bool {
    sys::inherited_socket_taken() || inherited().is_ok()
}

/// Waits for the child's hello on `ours`, then runs the handshake; on failure makes sure the
/// child is gone and says what it did.
fn handshake(child: &mut Child, ours: UnixStream, opts: &SpawnOptions) -> Result<Session, Error> {
    let deadline = Instant::now().checked_add(opts.timeout);
    let pid = child.id();
    loop {
        // Readable: the child's hello arrived, or its end closed (the handshake then fails).
        let left = deadline.map_or(EXIT_CHECK, |d| d.saturating_duration_since(Instant::now()));
        if crate::sys::poll(&ours, true, false, Some(left.min(EXIT_CHECK)))?.readable {
            break;
        }
        if let Some(status) = child.try_wait()? {
            return Err(exited(pid, status));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            kill(child);
            return Err(Error::Handshake(format!(
                "worker process {pid} did not call libchan::parent() within {:?} (is it a libchan worker?); it was killed",
                opts.timeout
            )));
        }
    }
    match Session::from_unix_stream_with(ours, Role::Acceptor, &opts.session) {
        Ok(session) => Ok(session),
        Err(e) => {
            // Most often the child closed its end by exiting: report how it exited.
            let until = Instant::now() + Duration::from_secs(1);
            let until = deadline.map_or(until, |d| d.max(until));
            while Instant::now() < until {
                if let Some(status) = child.try_wait()? {
                    return Err(exited(pid, status));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            kill(child);
            Err(Error::Handshake(format!(
                "with worker process {pid} (it was killed): {e}"
            )))
        }
    }
}

fn exited(pid: u32, status: std::process::ExitStatus) -> Error {
    Error::Handshake(format!(
        "worker process {pid} ended ({status}) before it called libchan::parent(): is it a libchan worker?"
    ))
}

fn kill(child: &mut Child) {
    // Errors mean it is already gone; `wait` reaps it either way.
    let _ = child.kill();
    let _ = child.wait();
}

/// The descriptor the parent left for us and its inode, checked: open, and the socket it names.
fn inherited() -> Result<(RawFd, u64), Error> {
    let var = std::env::var(PARENT_FD_VAR)
        .map_err(|_| not_spawned(&format!("{PARENT_FD_VAR} is not set")))?;
    let parsed = var
        .split_once(':')
        .and_then(|(fd, ino)| Some((fd.parse::<RawFd>().ok()?, ino.parse::<u64>().ok()?)));
    let Some((fd, inode)) = parsed.filter(|&(fd, _)| fd > 2) else {
        return Err(not_spawned(&format!(
            "{PARENT_FD_VAR}={var:?} is malformed"
        )));
    };
    sys::check_inherited_socket(fd, inode).map_err(|why| refused(fd, why))?;
    Ok((fd, inode))
}

/// Why the parent's socket, descriptor `fd`, cannot be taken, as an error.
fn refused(fd: RawFd, why: Refused) -> Error {
    match why {
        Refused::NotOpen => not_spawned(&format!("descriptor {fd} is not open")),
        Refused::NotTheSocket => not_spawned(&format!(
            "descriptor {fd} is not the socket {PARENT_FD_VAR} names"
        )),
        Refused::Taken => Error::Address(
            "libchan::parent() was already called in this process: the parent's socket is taken"
                .into(),
        ),
    }
}

fn not_spawned(why: &str) -> Error {
    Error::Address(format!(
        "this process was not started by libchan::spawn ({why}), so it has no parent session"
    ))
}
