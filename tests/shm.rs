//! The shared-memory transport between real processes: upgrade, opt-out, a peer's death, no
//! leaks, and more busy processes than cores.
//!
//! The test binary re-executes itself as the peer (`LIBCHAN_SHM_CHILD` names its role,
//! `LIBCHAN_SHM_ADDR` the address to connect to); `child_entry` is a no-op in the parent run.
//! Every child is killed and reaped when its test ends, and exits on its own after a while.

mod common;

use common::{eventually, fd_count, fresh_addr, with_timeout};

use std::process::Child;
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use libchan::{Options, RecvTimeoutError, SendTimeoutError, Sender, Transport};

/// A child gives up after this long whatever it is doing.
const CHILD_WATCHDOG: Duration = Duration::from_secs(30);

/// Tests that count fds, mappings or threads must not overlap with the others.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Child processes, killed and reaped on drop.
struct Kids(Vec<Child>);

impl Kids {
    fn spawn(role: &str, addr: &str, n: usize) -> Kids {
        let mut cmd = common::child_command("LIBCHAN_SHM", role, addr);
        Kids(
            (0..n)
                .map(|_| cmd.spawn().expect("spawn the child"))
                .collect(),
        )
    }

    fn kill_all(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
    }
}

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Mappings of libchan ring memfds in this process.
fn ring_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .expect("/proc/self/maps")
        .lines()
        .filter(|l| l.contains("libchan-ring"))
        .count()
}

/// libchan's threads in this process (they are all named `libchan-*`). Not every thread: the
/// test harness starts a thread for the next test (which then waits in `serial`) whenever it
/// likes, and that one is no leak.
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("libchan"))
        .count()
}

/// A same-uid session between two processes runs on shared memory, and `Options::shm(false)`
/// keeps it on the socket; both carry messages.
#[test]
fn same_uid_upgrades_and_opt_out_stays_on_the_socket() {
    let _g = serial();
    for (shm, want) in [(true, Transport::Shm), (false, Transport::Unix)] {
        let addr = fresh_addr("libchan-shm-test");
        let listener = libchan::listen_with(&addr, &Options::new().shm(shm)).unwrap();
        let _kids = Kids::spawn("echo", &addr, 1);
        with_timeout(Duration::from_secs(20), move || {
            let session = listener.accept().unwrap();
            assert_eq!(session.transport(), want);
            let tx = session.open_channel::<Sender<u64>>().unwrap();
            let (reply_tx, reply_rx) = libchan::pipe::<u64>();
            tx.send(reply_tx).unwrap();
            let got = reply_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            // The child reports the transport it saw: 1 for shm, 0 for unix.
            assert_eq!(*got, u64::from(want == Transport::Shm));
        });
    }
}

/// SIGKILL of the peer wakes a blocked `recv`, a `send` blocked on a full ring and a blocked
/// `accept_channel` with `Disconnected` within 100 ms; afterwards this process holds exactly
/// the fds, ring mappings and threads it held before the session.
#[test]
fn sigkill_wakes_every_blocked_call_and_leaks_nothing() {
    let _g = serial();
    // Earlier tests' sessions wind down within their poll interval: start from none of
    // libchan's threads, so that one of ours left behind shows.
    assert!(
        eventually(Duration::from_secs(5), || thread_count() == 0),
        "libchan threads of earlier tests still run"
    );
    let fds = fd_count();
    let maps = ring_mappings();
    let threads = thread_count();
    let addr = fresh_addr("libchan-shm-test");
    let listener = libchan::listen(&addr).unwrap();
    let mut kids = Kids::spawn("victim", &addr, 1);
    let (session, when, blocked) = with_timeout(Duration::from_secs(20), move || {
        let session = listener.accept().unwrap();
        assert_eq!(session.transport(), Transport::Shm);
        // The child opens one channel and sends one message, then never reads or sends again.
        let rx = session
            .accept_channel_timeout::<u64>(Duration::from_secs(10))
            .unwrap();
        assert_eq!(*rx.recv_timeout(Duration::from_secs(10)).unwrap(), 7);
        // A channel to the child that it never reads: fill its ring.
        let tx = session.open_channel::<Vec<u8>>().unwrap();
        let mut filled = 0;
        loop {
            match tx.send_timeout(vec![1u8; 4096], Duration::from_millis(100)) {
                Ok(()) => filled += 1,
                Err(SendTimeoutError::Timeout(_)) => break,
                Err(e) => panic!("filling: {e:?}"),
            }
            assert!(filled < 10_000, "the ring never fills");
        }
        // One ring each way is mapped here, and the session runs a thread of its own (what
        // the leak check below must see go).
        assert!(ring_mappings() >= 2, "rings mapped: {}", ring_mappings());
        assert!(
            thread_count() > threads,
            "no libchan thread runs the session"
        );
        let session = std::sync::Arc::new(session);
        let (at, when) = mpsc::channel::<(&'static str, Instant)>();
        let mut blocked = Vec::new();
        let a = at.clone();
        blocked.push(thread::spawn(move || {
            let r = rx.recv_timeout(Duration::from_secs(10));
            assert_eq!(r.err(), Some(RecvTimeoutError::Disconnected));
            a.send(("recv", Instant::now())).unwrap();
        }));
        let a = at.clone();
        blocked.push(thread::spawn(move || {
            let r = tx.send_timeout(vec![2u8; 4096], Duration::from_secs(10));
            assert!(matches!(r, Err(SendTimeoutError::Disconnected(_))), "{r:?}");
            a.send(("send", Instant::now())).unwrap();
        }));
        let s = session.clone();
        blocked.push(thread::spawn(move || {
            let r = s.accept_channel_timeout::<u64>(Duration::from_secs(10));
            assert!(matches!(r, Err(libchan::Error::Disconnected)), "{r:?}");
            at.send(("accept", Instant::now())).unwrap();
        }));
        thread::sleep(Duration::from_millis(100));
        (session, when, blocked)
    });
    let killed = Instant::now();
    kids.kill_all();
    let mut worst = Duration::ZERO;
    for _ in 0..3 {
        let (what, t) = when
            .recv_timeout(Duration::from_secs(5))
            .expect("a blocked call woke");
        let d = t.saturating_duration_since(killed);
        eprintln!("{what} woke {d:?} after SIGKILL");
        worst = worst.max(d);
    }
    for b in blocked {
        b.join().expect("a blocked call panicked");
    }
    assert!(
        worst < Duration::from_millis(100),
        "slowest wake-up took {worst:?}"
    );
    assert!(session.is_closed());
    drop(session);
    drop(kids);
    // The session's control thread ends within its poll interval once nothing uses it. (An
    // earlier test's sessions may still be winding down when the counts before were taken, so
    // nothing may exceed them; the assertion above that rings were mapped keeps this honest.)
    assert!(
        eventually(Duration::from_secs(5), || fd_count() <= fds
            && ring_mappings() <= maps
            && thread_count() <= threads),
        "leak: fds {fds} -> {}, ring mappings {maps} -> {}, threads {threads} -> {}",
        fd_count(),
        ring_mappings(),
        thread_count()
    );
}

/// Four processes ping-pong with this one over shared memory on a two-core machine: more busy
/// processes than cores, so waiting must back off instead of spinning the others out.
#[test]
fn four_processes_on_two_cores_stay_live() {
    const KIDS: usize = 4;
    const ROUNDS: u64 = 2000;
    let _g = serial();
    let addr = fresh_addr("libchan-shm-test");
    let listener = libchan::listen(&addr).unwrap();
    let _kids = Kids::spawn("pinger", &addr, KIDS);
    let total = with_timeout(Duration::from_secs(60), move || {
        let mut workers = Vec::new();
        for _ in 0..KIDS {
            let session = listener.accept().unwrap();
            assert_eq!(session.transport(), Transport::Shm);
            workers.push(thread::spawn(move || {
                let rx = session
                    .accept_channel_timeout::<u64>(Duration::from_secs(10))
                    .unwrap();
                let tx = session.open_channel::<u64>().unwrap();
                let mut n = 0;
                for m in rx.iter() {
                    tx.send(*m + 1).unwrap();
                    n += 1;
                }
                n
            }));
        }
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .sum::<u64>()
    });
    assert_eq!(total, KIDS as u64 * ROUNDS);
}

/// 10 000 nested channels over one shm session cost no fds: each ring's memfd is mapped and
/// closed as it arrives (what they do cost, one mapping each, is printed).
#[test]
fn ten_thousand_nested_channels_cost_no_fds() {
    const N: u64 = 10_000;
    let _g = serial();
    let fds = fd_count();
    let maps = ring_mappings();
    let (a, b) = libchan::Session::pair().unwrap();
    assert_eq!(a.transport(), Transport::Shm);
    let ctrl = a.open_channel::<Sender<u64>>().unwrap();
    let incoming = b.accept_channel::<Sender<u64>>().unwrap();
    let peer = thread::spawn(move || {
        // Keeps every sender (and so every ring) alive until told to stop.
        let mut keep = Vec::new();
        for (i, m) in incoming.iter().enumerate() {
            let tx = m.take(&*m).unwrap();
            tx.send(i as u64).unwrap();
            keep.push(tx);
        }
        keep.len()
    });
    let receivers: Vec<_> = (0..N)
        .map(|_| {
            let (tx, rx) = libchan::pipe::<u64>();
            ctrl.send(tx).unwrap();
            rx
        })
        .collect();
    for (i, rx) in receivers.iter().enumerate() {
        assert_eq!(*rx.recv_timeout(Duration::from_secs(10)).unwrap(), i as u64);
    }
    let used_fds = fd_count() as i64 - fds as i64;
    let used_maps = ring_mappings() - maps;
    eprintln!("{N} nested channels: {used_fds} more fds, {used_maps} more ring mappings");
    // One ring per nested channel, each seen from both ends of the pair (one process here).
    assert!(used_maps >= N as usize, "rings mapped: {used_maps}");
    // The session's own socket pair and eventfds are all the fds it holds.
    assert!(used_fds <= 8, "{used_fds} fds for {N} nested channels");
    drop(ctrl);
    assert_eq!(peer.join().unwrap(), N as usize);
    drop((receivers, a, b));
    assert!(
        // At most the baseline: what an earlier test left closing may close meanwhile.
        eventually(Duration::from_secs(5), || fd_count() <= fds
            && ring_mappings() <= maps),
        "leak: fds {fds} -> {}, ring mappings {maps} -> {}",
        fd_count(),
        ring_mappings()
    );
}

/// The name of the mapping of this process that contains `addr`, if any.
fn mapping_of(addr: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines().find_map(|l| {
        let (range, rest) = l.split_once(' ')?;
        let (a, b) = range.split_once('-')?;
        let (a, b) = (
            usize::from_str_radix(a, 16).ok()?,
            usize::from_str_radix(b, 16).ok()?,
        );
        (a <= addr && addr < b).then(|| rest.split_whitespace().nth(4).unwrap_or("").to_string())
    })
}

/// A small message is read where the sender wrote it, in the channel's ring; a message larger
/// than half a ring arrives in a sealed memfd of its own and is read in place there too.
#[test]
fn messages_are_read_in_place_in_rings_and_blobs() {
    let _g = serial();
    let (a, b) = libchan::Session::pair().unwrap();
    let tx = a.open_channel::<Vec<u8>>().unwrap();
    let rx = b.accept_channel::<Vec<u8>>().unwrap();
    let big: Vec<u8> = (0..3 << 20).map(|i: usize| (i % 251) as u8).collect();
    let sender = thread::spawn(move || {
        tx.send(vec![7u8; 100]).unwrap();
        tx.send(big).unwrap();
        tx.send(vec![8u8; 10]).unwrap();
    });
    let small = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let large = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let after = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    sender.join().unwrap();
    assert_eq!(small.as_slice(), [7u8; 100]);
    assert_eq!(large.len(), 3 << 20);
    assert!(large.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    assert_eq!(after.as_slice(), [8u8; 10]);
    let small_map = mapping_of(small.as_bytes().as_ptr() as usize).unwrap_or_default();
    let large_map = mapping_of(large.as_bytes().as_ptr() as usize).unwrap_or_default();
    assert!(
        small_map.contains("libchan-ring"),
        "small message read from {small_map:?}"
    );
    assert!(
        large_map.contains("libchan-blob"),
        "large message read from {large_map:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The child side
// ---------------------------------------------------------------------------------------------

#[test]
fn child_entry() {
    let Some((role, addr)) = common::child_role("LIBCHAN_SHM", CHILD_WATCHDOG) else {
        return;
    };
    match role.as_str() {
        "echo" => {
            let session = libchan::connect(&addr).unwrap();
            let rx = session.accept_channel::<Sender<u64>>().unwrap();
            let m = rx.recv().unwrap();
            let reply = m.take(&*m).unwrap();
            reply
                .send(u64::from(session.transport() == Transport::Shm))
                .unwrap();
            // Stay until the parent has read the answer and closed.
            let _ = rx.recv();
        }
        "victim" => {
            let session = libchan::connect(&addr).unwrap();
            let tx = session.open_channel::<u64>().unwrap();
            tx.send(7).unwrap();
            thread::sleep(CHILD_WATCHDOG);
        }
        "pinger" => {
            let session = libchan::connect(&addr).unwrap();
            let tx = session.open_channel::<u64>().unwrap();
            let rx = session.accept_channel::<u64>().unwrap();
            for i in 0..2000u64 {
                tx.send(i).unwrap();
                assert_eq!(*rx.recv().unwrap(), i + 1);
            }
        }
        other => panic!("unknown child role {other}"),
    }
}
