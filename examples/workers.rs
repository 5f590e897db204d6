//! Workers: a coordinator process re-executes itself as worker processes, connects to each over
//! a unix socket session and sends them jobs that carry their own reply channel.
//!
//! Run with `cargo run --release --example workers`.

use std::error::Error;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use libchan::{Receiver, Sender, Session};

/// A job for a worker: count the words of `text` and answer on `reply`.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Job {
    id: u64,
    text: String,
    reply: Sender<Answer>,
}

/// A worker's answer to one job.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Answer {
    id: u64,
    words: u32,
    worker_pid: u32,
}

const JOBS_PER_WORKER: u64 = 2_000;
const WORKER_ENV: &str = "LIBCHAN_EXAMPLE_WORKER_ADDR";

fn main() -> Result<(), Box<dyn Error>> {
    match std::env::var(WORKER_ENV) {
        Ok(addr) => worker(&addr),
        Err(_) => coordinator(),
    }
}

/// A worker process: connects back, then answers jobs until the coordinator closes the channel.
fn worker(addr: &str) -> Result<(), Box<dyn Error>> {
    let session = libchan::connect(addr)?;
    let jobs: Receiver<Job> = session.accept_channel()?;
    for job in jobs.iter() {
        // Read the job in place, take the reply channel it carries, answer on it.
        let reply = job.take(&job.reply)?;
        let answer = Answer {
            id: job.id.to_native(),
            words: job.text.split_whitespace().count() as u32,
            worker_pid: std::process::id(),
        };
        reply.send(answer)?;
    }
    Ok(())
}

/// Per-worker results for the table.
struct Report {
    pid: u32,
    transport: libchan::Transport,
    jobs: u64,
    p50: Duration,
    p99: Duration,
}

fn coordinator() -> Result<(), Box<dyn Error>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = cores.min(4);
    let addr = format!("unix:@libchan-workers-{}", std::process::id());
    let listener = libchan::listen(&addr)?;

    // Re-execute this binary as `n` workers; each connects back to the listener.
    let exe = std::env::current_exe()?;
    let mut children: Vec<Child> = (0..n)
        .map(|_| Command::new(&exe).env(WORKER_ENV, &addr).spawn())
        .collect::<Result<_, _>>()?;
    let sessions: Vec<Session> = (0..n)
        .map(|_| listener.accept())
        .collect::<Result<_, _>>()?;
    println!(
        "coordinator {}: {n} workers ({cores} cores)",
        std::process::id()
    );

    // One thread per worker sends jobs one at a time and times each round trip.
    let started = Instant::now();
    let threads: Vec<_> = sessions
        .into_iter()
        .map(|session| std::thread::spawn(move || drive(session)))
        .collect();
    let mut reports = Vec::new();
    for t in threads {
        reports.push(t.join().expect("a coordinator thread panicked")?);
    }
    let elapsed = started.elapsed();

    // The job channels are closed now: every worker sees its channel end and exits.
    for child in &mut children {
        let status = child.wait()?;
        if !status.success() {
            return Err(format!("worker {} exited with {status}", child.id()).into());
        }
    }

    println!("\nworker pid  transport      jobs  round-trip p50  p99");
    for r in &reports {
        println!(
            "{:>10}  {:<9}  {:>8}  {:>14.1?}  {:.1?}",
            r.pid, r.transport, r.jobs, r.p50, r.p99
        );
    }
    let total: u64 = reports.iter().map(|r| r.jobs).sum();
    println!("\n{total} jobs answered in {elapsed:.2?}; all workers exited cleanly.");
    println!("\nNot yet: pinning each worker to its own core, shared-memory rings (zero copy on");
    println!("one host) and the TCP/TLS fallback arrive with later issues; today every session");
    println!("runs on a unix socket.");
    Ok(())
}

/// Sends this worker its jobs, each with a fresh reply channel, and collects the round trips.
fn drive(session: Session) -> Result<Report, String> {
    let jobs: Sender<Job> = session.open_channel().map_err(|e| e.to_string())?;
    let mut rtts = Vec::with_capacity(JOBS_PER_WORKER as usize);
    let mut pid = 0;
    for id in 0..JOBS_PER_WORKER {
        let (reply, answers) = libchan::pipe::<Answer>();
        let text = format!("job {id} for a worker process");
        let t0 = Instant::now();
        jobs.send(Job { id, text, reply })
            .map_err(|_| "worker gone")?;
        let answer = answers.recv().map_err(|e| e.to_string())?;
        rtts.push(t0.elapsed());
        if answer.id != id || answer.words != 6 {
            return Err(format!("wrong answer to job {id}"));
        }
        pid = answer.worker_pid.to_native();
    }
    rtts.sort();
    Ok(Report {
        pid,
        transport: session.transport(),
        jobs: JOBS_PER_WORKER,
        p50: rtts[rtts.len() / 2],
        p99: rtts[rtts.len() * 99 / 100],
    })
}
