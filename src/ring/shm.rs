//! `ShmRegion`: a ring [`Region`] over a memfd mapped shared and read-write.
//!
//! The same-host transport lays one ring per channel direction out in a memfd: one side
//! [`create`](ShmRegion::create)s it, sends the fd over the control socket (SCM_RIGHTS), and the
//! peer [`map`](ShmRegion::map)s its own view of the same pages. The ring then runs on both
//! mappings, synchronising only through the atomics in the shared bytes.
//!
//! # Invariants
//!
//! - The file behind a mapping can never shrink: `create` seals its size before mapping, and
//!   `map` refuses an fd whose size is not sealed, or whose size is not exactly the expected
//!   length. An unsealed peer-sent memfd could be truncated under us, and every access past the
//!   new end would raise SIGBUS. Seals are never removed, so the check holds for the mapping's
//!   life.
//! - The mapping is only ever touched through raw pointers and atomics (`memmap2::MmapRaw` hands
//!   out nothing else). No `&[u8]`/`&mut [u8]` is ever formed over it: the peer writes these
//!   bytes concurrently.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use memmap2::{MmapOptions, MmapRaw};

use super::region::{Region, REGION_ALIGN};
use crate::sys::{memfd, seal, seals, size, Seal};

/// A shared, read-write mapping of a size-sealed memfd, unmapped when the last handle to it
/// (see [`share`](ShmRegion::share)) drops.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug)]
pub(crate) struct ShmRegion {
    map: std::sync::Arc<MmapRaw>,
}

#[cfg_attr(not(test), allow(dead_code))]
impl ShmRegion {
    /// Creates a zero-filled memfd of `len` bytes, seals its size, and maps it. Returns the
    /// region and the fd to send to the peer (close-on-exec; it may be closed once sent: the
    /// mapping keeps the memory alive).
    ///
    /// # Errors
    ///
    /// `InvalidInput` if `len` is zero; otherwise the errors of `memfd_create`, `ftruncate`,
    /// `fcntl(F_ADD_SEALS)` and `mmap` (e.g. `ENOMEM`, `EMFILE`).
    pub(crate) fn create(len: usize) -> io::Result<(ShmRegion, OwnedFd)> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a shared region cannot be empty",
            ));
        }
        let fd = memfd("libchan-ring", len)?;
        seal(fd.as_fd(), Seal::Size)?;
        let region = Self::map(fd.as_fd(), len)?;
        Ok((region, fd))
    }

    /// Maps the memfd `fd` (typically received from a peer), after checking that its size is
    /// sealed and is exactly `expected_len` bytes.
    ///
    /// The contents are the peer's: a ring attached to the region still validates everything it
    /// reads.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if `expected_len` is zero; `InvalidData` if the fd's size is not sealed
    /// (`F_SEAL_SHRINK | F_SEAL_GROW`) or differs from `expected_len`; `EINVAL` (from reading
    /// the seals) if `fd` is not a memfd; `EPERM`/`EACCES` from `mmap` if it cannot be mapped
    /// writable (write-sealed, or opened read-only).
    pub(crate) fn map(fd: BorrowedFd<'_>, expected_len: usize) -> io::Result<ShmRegion> {
        if expected_len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a shared region cannot be empty",
            ));
        }
        // Seals first: the size means nothing while the peer can still change it.
        if !seals(fd)?.size_fixed() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "shared memory fd does not have its size sealed",
            ));
        }
        let actual = size(fd)?;
        if actual != expected_len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("shared memory fd has {actual} bytes, expected {expected_len}"),
            ));
        }
        let map = MmapOptions::new().len(expected_len).map_raw(&fd)?;
        // `mmap` at offset 0 returns a page-aligned address; `Region` promises 128. Check
        // rather than assume, since everything built on the region relies on it.
        if map.as_mut_ptr() as usize % REGION_ALIGN != 0 || map.len() != expected_len {
            return Err(io::Error::other("mapping is not 128-byte aligned"));
        }
        Ok(Self {
            map: std::sync::Arc::new(map),
        })
    }

    /// Another handle to the same mapping, which stays mapped while either lives: a ring's
    /// reader keeps one to hand the ring back for reuse after the reader itself is gone.
    pub(crate) fn share(&self) -> ShmRegion {
        Self {
            map: self.map.clone(),
        }
    }
}

// SAFETY: each promise of the `Region` contract, for as long as the `ShmRegion` lives:
// - Non-null, `REGION_ALIGN`-aligned, constant pointer; constant length: `MmapRaw` returns the
//   address and length of one `mmap` call, made once in `map` and unmapped only when the last
//   handle to it drops (`share` hands out more; the mapping is never moved or resized); `map`
//   checked the alignment (mmap is page-aligned) and refused a zero length, for which memmap2
//   would return a dangling placeholder.
// - All `len` bytes initialised, readable and writable from any thread: the mapping is
//   `MAP_SHARED` with `PROT_READ | PROT_WRITE` (`map_raw`), and every byte is backed by the
//   file: its size equals the mapping's length, and the size seal (checked before mapping, and
//   never removable) means nobody can truncate it to make an access fault with SIGBUS. memfd
//   pages are zero-filled until written, so a fresh region from `create` is all zeroes; a
//   region mapped from a peer holds whatever bytes the peer wrote, which the ring validates.
// - No `&`/`&mut` over the bytes from this side: `ShmRegion` never forms one and `MmapRaw` only
//   hands out raw pointers. Another process writing the same pages is not a Rust reference in
//   this process; the ring treats its writes as hostile input, read through atomics and
//   bounds-checked.
unsafe impl Region for ShmRegion {
    fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::process::{Child, Command, Stdio};
    use std::ptr;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::mpsc;
    use std::thread;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::ring::spsc::{region_len, Consumer, Producer};
    use crate::sys::{futex_wait, futex_wake, WaitResult};

    /// Copies `len` bytes at `offset` out of `region`.
    fn read(region: &ShmRegion, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= region.len());
        let mut out = vec![0; len];
        let src = region.as_ptr().wrapping_add(offset);
        // SAFETY: `copy_nonoverlapping` requires a source valid for `len` reads (inside the
        // region, asserted above; initialised by the `Region` contract), a destination valid for
        // `len` writes (`out` has `len` bytes) and no overlap (`out` is a fresh heap vector).
        // Nothing writes the region concurrently in the tests that call this.
        unsafe { ptr::copy_nonoverlapping(src, out.as_mut_ptr(), len) };
        out
    }

    /// Copies `data` into `region` at `offset`.
    fn write(region: &ShmRegion, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= region.len());
        let dst = region.as_ptr().wrapping_add(offset);
        // SAFETY: `copy_nonoverlapping` requires a source valid for `data.len()` reads (a
        // slice), a destination valid for as many writes (inside the region, asserted above;
        // writable by the `Region` contract) and no overlap (`data` is not in a mapping). Nothing
        // accesses the region concurrently in the tests that call this.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }

    /// The 32-bit word at `offset` in `region`, as an atomic.
    fn word(region: &ShmRegion, offset: usize) -> &AtomicU32 {
        assert!(offset % 4 == 0 && offset + 4 <= region.len());
        let ptr = region.as_ptr().wrapping_add(offset).cast::<AtomicU32>();
        // SAFETY: creating `&AtomicU32` requires a non-null pointer, 4-aligned, to 4 initialised
        // bytes that stay valid for the borrow and are only accessed atomically meanwhile: the
        // region base is page-aligned and `offset` a multiple of 4 inside it (asserted); the
        // borrow is tied to `region`, which keeps the mapping alive; both processes access
        // these control words only through `AtomicU32`.
        unsafe { &*ptr }
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd and mmap are system calls miri cannot run")]
    fn create_is_zeroed_aligned_and_sealed() {
        let (region, fd) = ShmRegion::create(10_000).unwrap();
        assert_eq!(region.len(), 10_000);
        assert_eq!(region.as_ptr() as usize % REGION_ALIGN, 0);
        assert!(read(&region, 0, 10_000).iter().all(|&b| b == 0));
        assert!(crate::sys::seals(fd.as_fd()).unwrap().size_fixed());
        assert_eq!(size(fd.as_fd()).unwrap(), 10_000);
        // The fd stays close-on-exec: it reaches a peer only when sent on purpose.
        let flags = rustix::io::fcntl_getfd(&fd).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd and mmap are system calls miri cannot run")]
    fn two_mappings_share_bytes_and_outlive_the_fd() {
        let (a, fd) = ShmRegion::create(8192).unwrap();
        let b = ShmRegion::map(fd.as_fd(), 8192).unwrap();
        assert_ne!(a.as_ptr(), b.as_ptr(), "two distinct mappings");
        drop(fd); // the mappings keep the memory alive
        write(&a, 100, b"written through a");
        assert_eq!(read(&b, 100, 17), b"written through a");
        write(&b, 8192 - 4, b"tail");
        assert_eq!(read(&a, 8192 - 4, 4), b"tail");
        word(&a, 4096).store(0xdead_beef, Ordering::Relaxed);
        assert_eq!(word(&b, 4096).load(Ordering::Relaxed), 0xdead_beef);
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd and mmap are system calls miri cannot run")]
    fn map_refuses_unsealed_resized_or_foreign_fds() {
        let bad_data = |r: io::Result<ShmRegion>| r.unwrap_err().kind();

        // Not size-sealed: a peer could shrink it under us.
        let unsealed = memfd("libchan-test", 4096).unwrap();
        assert_eq!(
            bad_data(ShmRegion::map(unsealed.as_fd(), 4096)),
            io::ErrorKind::InvalidData
        );
        // Only shrink-sealed is still not "size fixed".
        rustix::fs::fcntl_add_seals(&unsealed, rustix::fs::SealFlags::SHRINK).unwrap();
        assert_eq!(
            bad_data(ShmRegion::map(unsealed.as_fd(), 4096)),
            io::ErrorKind::InvalidData
        );

        // Sealed, but not the size we were told.
        let (_region, fd) = ShmRegion::create(4096).unwrap();
        for wrong in [4095, 4097, 8192] {
            assert_eq!(
                bad_data(ShmRegion::map(fd.as_fd(), wrong)),
                io::ErrorKind::InvalidData
            );
        }
        assert_eq!(
            bad_data(ShmRegion::map(fd.as_fd(), 0)),
            io::ErrorKind::InvalidInput
        );
        assert!(ShmRegion::create(0).is_err());

        // Not a memfd at all.
        let (reader, _writer) = rustix::pipe::pipe().unwrap();
        assert!(ShmRegion::map(reader.as_fd(), 4096).is_err());

        // Write-sealed: cannot be mapped writable.
        let frozen = memfd("libchan-test", 4096).unwrap();
        seal(frozen.as_fd(), Seal::Immutable).unwrap();
        assert!(ShmRegion::map(frozen.as_fd(), 4096).is_err());
    }

    // ---------------------------------------------------------------------------------------
    // Records for the ring tests: `seq`, a body derived from `seq`, a checksum of the rest.
    // ---------------------------------------------------------------------------------------

    /// Payload length of record `seq`, in `12..=256`.
    fn record_len(seq: u64) -> usize {
        let x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        12 + ((x ^ (x >> 29)) % 245) as usize
    }

    fn checksum(bytes: &[u8]) -> u32 {
        let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        (h ^ (h >> 32)) as u32
    }

    fn make_record(seq: u64, buf: &mut Vec<u8>) {
        let len = record_len(seq);
        buf.clear();
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend((0..len - 12).map(|i| (seq as usize * 31 + i * 7) as u8));
        let sum = checksum(buf);
        buf.extend_from_slice(&sum.to_le_bytes());
    }

    /// Checks record `seq` (order, length, checksum), or says what is wrong.
    fn check_record(seq: u64, got: &[u8]) -> Result<(), String> {
        if got.len() != record_len(seq) {
            return Err(format!("record {seq}: length {}", got.len()));
        }
        let (body, sum) = got.split_at(got.len() - 4);
        if checksum(body).to_le_bytes() != sum {
            return Err(format!("record {seq}: bad checksum"));
        }
        let got_seq = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
        if got_seq != seq {
            return Err(format!("record {seq}: carries sequence number {got_seq}"));
        }
        Ok(())
    }

    /// Pushes records `0..count` into `p`, yielding while the ring is full; `alive` is asked
    /// whether to keep trying (false ends the test with a panic).
    fn produce(
        p: &mut Producer<ShmRegion>,
        count: u64,
        deadline: Instant,
        mut alive: impl FnMut() -> bool,
    ) {
        let mut buf = Vec::new();
        for seq in 0..count {
            make_record(seq, &mut buf);
            loop {
                if let Some(mut grant) = p.reserve(buf.len()).expect("ring not corrupt") {
                    grant.write(&buf);
                    grant.commit();
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "producer timed out at record {seq}"
                );
                assert!(alive(), "consumer went away at record {seq}");
                thread::yield_now();
            }
        }
    }

    /// Pops and checks records `0..count` from `c`, releasing in batches; then checks the ring
    /// is empty.
    fn consume(c: &mut Consumer<ShmRegion>, count: u64, deadline: Instant) -> Result<(), String> {
        let mut buf = Vec::new();
        let mut seq = 0;
        while seq < count {
            let Some(rec) = c.pop().map_err(|e| e.to_string())? else {
                c.release();
                if Instant::now() >= deadline {
                    return Err(format!("consumer timed out at record {seq}"));
                }
                thread::yield_now();
                continue;
            };
            buf.resize(rec.len(), 0);
            c.copy_to(rec, &mut buf);
            check_record(seq, &buf)?;
            seq += 1;
            if seq % 16 == 0 {
                c.release();
            }
        }
        c.release();
        match c.pop() {
            Ok(None) => Ok(()),
            other => Err(format!("ring not empty after {count} records: {other:?}")),
        }
    }

    const RING_CAPACITY: usize = 64 * 1024;

    #[test]
    #[cfg_attr(miri, ignore = "memfd and mmap are system calls miri cannot run")]
    fn ring_round_trips_between_two_mappings() {
        let (a, fd) = ShmRegion::create(region_len(RING_CAPACITY)).unwrap();
        let b = ShmRegion::map(fd.as_fd(), region_len(RING_CAPACITY)).unwrap();
        // SAFETY: `attach` requires that no other producer is attached to this ring; the memfd
        // was created just above and this is the only producer attached to any mapping of it.
        let mut p = unsafe { Producer::attach(a) }.expect("fresh ring is valid");
        // SAFETY: `attach` requires that no other consumer is attached to this ring; the memfd
        // was created just above and this is the only consumer attached to any mapping of it.
        let mut c = unsafe { Consumer::attach(b) }.expect("fresh ring is valid");
        let count = 20_000; // ~2.7 MB through a 64 KiB ring: dozens of laps
        let deadline = Instant::now() + Duration::from_secs(60);
        let (done_tx, done_rx) = mpsc::channel();
        let consumer = thread::spawn(move || done_tx.send(consume(&mut c, count, deadline)));
        produce(&mut p, count, deadline, || true);
        let result = done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("consumer finished in time");
        consumer.join().unwrap().unwrap();
        result.unwrap();
    }

    // ---------------------------------------------------------------------------------------
    // A real second process: the test binary re-executes itself into `child_entry`.
    // ---------------------------------------------------------------------------------------

    /// Env var naming the inherited ring memfd in the child; its absence makes `child_entry` a
    /// no-op in a normal test run.
    const ENV_RING_FD: &str = "LIBCHAN_SHM_CHILD_RING_FD";
    /// Env var naming the inherited control memfd (the futex words) in the child.
    const ENV_CTL_FD: &str = "LIBCHAN_SHM_CHILD_CTL_FD";
    /// Records the parent sends through the ring.
    const CROSS_RECORDS: u64 = 100_000;
    /// Futex ping-pong round trips.
    const ROUND_TRIPS: u32 = 1000;
    /// The control region: `ping` (parent -> child) and `pong` (child -> parent) on separate
    /// cache-line pairs.
    const CTL_LEN: usize = 4096;
    const PING: usize = 0;
    const PONG: usize = 128;
    /// Each side gives up after this long, whatever it is doing (the child's watchdog, should
    /// its parent vanish; the whole exchange takes about a second).
    const LIMIT: Duration = Duration::from_secs(30);

    /// Waits until `word` holds `want`, parking on the futex. False at the deadline, or when
    /// `alive` (asked only after a wait times out, to keep it off the measured path) says the
    /// peer is gone.
    fn wait_for(
        word: &AtomicU32,
        want: u32,
        deadline: Instant,
        mut alive: impl FnMut() -> bool,
    ) -> bool {
        loop {
            // Acquire: pairs with the peer's Release store of `want` in the ping-pong loop.
            let now = word.load(Ordering::Acquire);
            if now == want {
                return true;
            }
            // Bounded, so a lost wake-up is a slow test rather than a hang.
            let waited = futex_wait(word, now, Some(Duration::from_millis(100))).expect("futex");
            if waited == WaitResult::TimedOut && (Instant::now() >= deadline || !alive()) {
                return false;
            }
        }
    }

    /// Kills and reaps the child when the test ends, pass or fail.
    struct KillOnDrop(Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A duplicate of `fd` without close-on-exec, for a child to inherit.
    fn inheritable(fd: BorrowedFd<'_>) -> OwnedFd {
        let dup = rustix::io::fcntl_dupfd_cloexec(fd, 0).expect("dup");
        rustix::io::fcntl_setfd(&dup, rustix::io::FdFlags::empty()).expect("clear FD_CLOEXEC");
        dup
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd and mmap are system calls miri cannot run")]
    fn cross_process_ring_and_futex_ping_pong() {
        let (ring, ring_fd) = ShmRegion::create(region_len(RING_CAPACITY)).unwrap();
        let (ctl, ctl_fd) = ShmRegion::create(CTL_LEN).unwrap();
        // SAFETY: `attach` requires that no other producer is attached to this ring; the memfd
        // was created just above, and the child attaches only a consumer.
        let mut producer = unsafe { Producer::attach(ring) }.expect("fresh ring is valid");

        // The duplicates are inheritable from here until they drop right after the spawn; a
        // child another test spawns meanwhile inherits them too, which is harmless.
        let ring_dup = inheritable(ring_fd.as_fd());
        let ctl_dup = inheritable(ctl_fd.as_fd());
        let exe = std::env::current_exe().expect("path of the test binary");
        let child = Command::new(exe)
            .args([
                "--exact",
                "ring::shm::tests::child_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV_RING_FD, ring_dup.as_raw_fd().to_string())
            .env(ENV_CTL_FD, ctl_dup.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null()) // the child's harness chatter; its panics go to stderr
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the child");
        let mut child = KillOnDrop(child);
        drop((ring_dup, ctl_dup, ring_fd, ctl_fd));

        let deadline = Instant::now() + LIMIT;
        let start = Instant::now();
        produce(&mut producer, CROSS_RECORDS, deadline, || {
            matches!(child.0.try_wait(), Ok(None))
        });
        let produced_in = start.elapsed();

        let (ping, pong) = (word(&ctl, PING), word(&ctl, PONG));
        let mut round_trips = Vec::with_capacity(ROUND_TRIPS as usize);
        for i in 1..=ROUND_TRIPS {
            let t0 = Instant::now();
            // Release: pairs with the Acquire load in the child's `wait_for(ping, i)`.
            ping.store(i, Ordering::Release);
            futex_wake(ping, 1).expect("futex_wake");
            assert!(
                wait_for(pong, i, deadline, || matches!(child.0.try_wait(), Ok(None))),
                "no pong {i} from the child (status {:?})",
                child.0.try_wait()
            );
            round_trips.push(t0.elapsed());
        }

        let status = loop {
            if let Some(status) = child.0.try_wait().expect("try_wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "child did not exit in time");
            thread::sleep(Duration::from_millis(5));
        };
        assert!(status.success(), "child failed: {status}");

        round_trips.sort();
        let pct = |p: usize| round_trips[(round_trips.len() - 1) * p / 100];
        eprintln!(
            "shm cross-process: {CROSS_RECORDS} records in {produced_in:?}; futex ping-pong \
             round trip over {ROUND_TRIPS}: p50 {:?}, p99 {:?}, min {:?}",
            pct(50),
            pct(99),
            round_trips[0]
        );
    }

    /// The child half of `cross_process_ring_and_futex_ping_pong`; a no-op unless run by it.
    #[test]
    #[cfg_attr(miri, ignore = "memfd and mmap are system calls miri cannot run")]
    fn child_entry() {
        let (Ok(ring_fd), Ok(ctl_fd)) = (std::env::var(ENV_RING_FD), std::env::var(ENV_CTL_FD))
        else {
            return;
        };
        let ring_fd: i32 = ring_fd.parse().expect("ring fd number");
        let ctl_fd: i32 = ctl_fd.parse().expect("control fd number");
        // SAFETY: `from_raw_fd` requires an open fd that nothing else owns. The parent passed
        // the number of a memfd duplicate it made inheritable for this exec; the child inherited
        // it open, and no other code in this process knows the number (the harness opens no fd
        // on it: it was taken when the process started).
        let ring_fd = unsafe { OwnedFd::from_raw_fd(ring_fd) };
        // SAFETY: as for `ring_fd` just above: an inherited, otherwise unowned memfd.
        let ctl_fd = unsafe { OwnedFd::from_raw_fd(ctl_fd) };
        let deadline = Instant::now() + LIMIT;
        let parent = rustix::process::getppid().expect("spawned by the parent test");

        let ring = ShmRegion::map(ring_fd.as_fd(), region_len(RING_CAPACITY)).expect("map ring");
        let ctl = ShmRegion::map(ctl_fd.as_fd(), CTL_LEN).expect("map control words");
        drop((ring_fd, ctl_fd));
        // SAFETY: `attach` requires that no other consumer is attached to this ring; the parent
        // attaches only the producer and spawns one child.
        let mut consumer = unsafe { Consumer::attach(ring) }.expect("ring is valid");
        consume(&mut consumer, CROSS_RECORDS, deadline).expect("records arrive intact");

        let (ping, pong) = (word(&ctl, PING), word(&ctl, PONG));
        for i in 1..=ROUND_TRIPS {
            let parent_alive = || rustix::process::getppid() == Some(parent);
            assert!(
                wait_for(ping, i, deadline, parent_alive),
                "no ping {i} from the parent"
            );
            // Release: pairs with the Acquire load in the parent's `wait_for(pong, i)`.
            pong.store(i, Ordering::Release);
            futex_wake(pong, 1).expect("futex_wake");
        }
    }
}
