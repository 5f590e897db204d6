//! What a job that carries its own reply channel costs: the libchan idiom of sending a fresh
//! `Sender` with each request and answering on it, timed between two processes.
//!
//! ```sh
//! cargo run --release --example replies -- [--jobs N]
//! ```
//!
//! The coordinator (pinned to cpu 0) starts a worker (pinned to cpu 1) over a session with
//! shared memory, then one without it (`unix`), and in each sends `N` jobs one at a time: each
//! job carries a new `Sender<u64>`, the worker takes it and answers once, and the coordinator
//! waits for the answer before the next job. It prints the time per job (p50, p90, p99) for
//! both transports, measured in the same run.
//!
//! On shared memory the job and its `Sender` go through the channel's ring (the `Sender` as a
//! descriptor naming a ring the worker offered ahead of time, see "ring offers" in
//! docs/PROTOCOL.md) and the answer through that offered ring; on `unix` everything goes
//! through the socket.

use std::error::Error;
use std::process::Command;
use std::time::Instant;

use libchan::rkyv::{Archive, Deserialize, Serialize};
use libchan::{Options, Sender, SpawnOptions};

type Result<T, E = Box<dyn Error + Send + Sync>> = std::result::Result<T, E>;

/// A job: a number, and where its answer goes.
#[derive(Archive, Serialize, Deserialize)]
#[rkyv(crate = libchan::rkyv)]
struct Job {
    id: u64,
    reply: Sender<u64>,
}

/// Set for the worker: whether its session uses shared memory.
const SHM_ENV: &str = "LIBCHAN_REPLIES_SHM";

fn main() -> Result<()> {
    if libchan::is_worker() {
        let shm = std::env::var(SHM_ENV).is_ok_and(|v| v == "1");
        let parent = libchan::parent_with(&Options::new().shm(shm))?;
        let jobs = parent.accept_channel::<Job>()?;
        for job in jobs.iter() {
            let reply = job.take(&job.reply)?;
            reply.send(job.id.to_native() * 2)?;
        }
        return Ok(());
    }
    let mut n = 5_000;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--jobs" => n = args.next().ok_or("--jobs needs a value")?.parse()?,
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    pin_to_cpu0();
    println!("transport   jobs    p50 us    p90 us    p99 us");
    for shm in [true, false] {
        let (p50, p90, p99, transport) = run(shm, n.max(10))?;
        println!("{transport:<9} {n:>6} {p50:>9.1} {p90:>9.1} {p99:>9.1}");
    }
    Ok(())
}

/// Runs `n` jobs against a new worker; returns the percentiles in microseconds and the
/// transport the session ran on.
fn run(shm: bool, n: usize) -> Result<(f64, f64, f64, String)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env(SHM_ENV, if shm { "1" } else { "0" });
    let opts = SpawnOptions::new().core(1).session(Options::new().shm(shm));
    let (mut child, session) = libchan::spawn_with(cmd, &opts)?;
    let jobs = session.open_channel::<Job>()?;
    let mut times = Vec::with_capacity(n);
    for id in 0..n as u64 {
        let t0 = Instant::now();
        let (reply, answers) = libchan::pipe::<u64>();
        jobs.send(Job { id, reply })?;
        let answer = answers.recv()?;
        if *answer != id * 2 {
            return Err(format!("job {id}: answer {}", *answer).into());
        }
        times.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    drop(jobs);
    child.wait()?;
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    Ok((at(0.5), at(0.9), at(0.99), session.transport().to_string()))
}

/// Pins this thread (and the threads it starts) to cpu 0; a machine without it runs unpinned.
fn pin_to_cpu0() {
    let mut set = rustix::thread::CpuSet::new();
    set.set(0);
    let _ = rustix::thread::sched_setaffinity(None, &set);
}
