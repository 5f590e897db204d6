//! Worker process start-up: what a spawned child does between fork and exec, and how it takes
//! the socket it inherited.
//!
//! Both are the unsafe halves of `crate::spawn`, kept here behind safe functions:
//!
//! - [`inherit_and_pin`] installs a `pre_exec` hook. The hook runs in the forked child, where
//!   only async-signal-safe calls are allowed, so its body is fixed here and not a caller's
//!   closure: it clears close-on-exec on one descriptor and sets the CPU affinity.
//! - [`take_inherited_socket`] turns a descriptor number from the environment into an
//!   `OwnedFd`. It does so only for an open socket with the expected inode, above stdio, and
//!   once per process, so no other owner of that descriptor can exist in this process.

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::io::FdFlags;
use rustix::thread::CpuSet;

/// Set once [`take_inherited_socket`] took the inherited socket: it can be taken only once.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Why the inherited socket cannot be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The descriptor is not open in this process (or it is one of stdin, stdout, stderr).
    NotOpen,
    /// The descriptor is open but is not the socket with the expected inode.
    NotTheSocket,
    /// An earlier call took it.
    Taken,
}

/// Makes the process `cmd` starts inherit `keep` (its close-on-exec flag is cleared in the
/// child, between fork and exec, so no other child of ours inherits it) and, with `cpus`, run
/// on those CPUs from its first instruction. The command owns `keep` from now on: dropping the
/// command closes it in this process.
pub(crate) fn inherit_and_pin(cmd: &mut Command, keep: OwnedFd, cpus: Option<CpuSet>) {
    let hook = move || -> std::io::Result<()> {
        rustix::io::fcntl_setfd(&keep, FdFlags::empty())?;
        if let Some(set) = &cpus {
            rustix::thread::sched_setaffinity(None, set)?;
        }
        Ok(())
    };
    // SAFETY: `pre_exec` needs a hook that is safe to run in the forked child before exec,
    // where only async-signal-safe calls are allowed. `hook` makes two system calls (fcntl
    // and sched_setaffinity, through rustix, which neither allocates nor locks), reads only
    // values it owns (the descriptor and the CPU set) and converts errors to `io::Error`
    // from a raw errno, which does not allocate either.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Checks that descriptor `fd` is open, above stdio, and is the socket with inode `inode`
/// (through `/proc/self/fd`).
pub(crate) fn check_inherited_socket(fd: RawFd, inode: u64) -> Result<(), Refused> {
    if fd <= 2 {
        return Err(Refused::NotOpen);
    }
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(|_| Refused::NotOpen)?;
    if link.as_os_str() != format!("socket:[{inode}]").as_str() {
        return Err(Refused::NotTheSocket);
    }
    Ok(())
}

/// Takes ownership of the socket this process inherited as descriptor `fd` with inode
/// `inode`, after [`check_inherited_socket`]; only the first successful call in a process
/// gets it. The descriptor's close-on-exec flag is left as it is.
pub(crate) fn take_inherited_socket(fd: RawFd, inode: u64) -> Result<OwnedFd, Refused> {
    check_inherited_socket(fd, inode)?;
    // The flag guards only itself: its one `swap` winner is all that matters (the Acquire
    // load in `inherited_socket_taken` pairs with this Release half).
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Err(Refused::Taken);
    }
    // SAFETY: `OwnedFd::from_raw_fd` needs `fd` open and owned by nobody else. The check
    // above found it open, above stdio (which std's handles use), and the very socket our
    // parent made for us (its inode is the one the parent wrote down): a descriptor this
    // process inherited across exec, which nothing in it opened and so nothing else owns.
    // `TAKEN` makes sure this is done once, so there is only ever one `OwnedFd` for it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// True once [`take_inherited_socket`] has succeeded in this process.
pub(crate) fn inherited_socket_taken() -> bool {
    TAKEN.load(Ordering::Acquire)
}

/// Marks `fd` close-on-exec again, so that the processes this one starts do not inherit it.
pub(crate) fn set_cloexec(fd: impl AsFd) -> std::io::Result<()> {
    Ok(rustix::io::fcntl_setfd(fd, FdFlags::CLOEXEC)?)
}
