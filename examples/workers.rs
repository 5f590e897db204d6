//! libchan's demo: one worker process per core, pinned, answering jobs at memory speed.
//!
//! ```sh
//! cargo run --release --example workers -- [--workers N] [--duration SECS] [--size BYTES]
//! ```
//!
//! The coordinator starts one worker per core with `libchan::spawn` (the workers are this
//! same program: `libchan::is_worker()` tells them apart) and one more that connects over
//! `tcp://127.0.0.1` without shared memory, to show the same code over the network. Then:
//!
//! - every job carries the `Sender` its answer goes back on;
//! - each worker's first job carries a file descriptor (a memfd) that the worker reads;
//! - the workers form a ring of channels that the coordinator created and handed out: after
//!   each job a worker tells the next one, directly, not through the coordinator;
//! - a progress bar runs on stderr, and a table per worker ends the run.
//!
//! Ctrl-C ends the run early and cleanly: the coordinator stops sending jobs, closes each
//! worker's job channel (a worker exits when it closes), waits for every worker, prints the
//! table so far and exits 0. The workers run in process groups of their own, so the terminal's
//! Ctrl-C reaches only the coordinator; a worker whose coordinator dies any other way sees its
//! session close and exits. Nothing is left behind.

use std::error::Error;
use std::io::{Read, Seek, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use libchan::rkyv::{Archive, Deserialize, Serialize};
use libchan::{Fd, Options, Receiver, Sender, Session, SpawnOptions};

type Result<T, E = Box<dyn Error + Send + Sync>> = std::result::Result<T, E>;

/// A job: what to do, and where to send the answer.
#[derive(Archive, Serialize, Deserialize)]
#[rkyv(crate = libchan::rkyv)]
struct Job {
    id: u64,
    task: Task,
    reply: Sender<Answer>,
}

#[derive(Archive, Serialize, Deserialize)]
#[rkyv(crate = libchan::rkyv)]
enum Task {
    /// Add up these bytes.
    Sum(Vec<u8>),
    /// Read this file and count its bytes.
    Read(Fd),
}

#[derive(Archive, Serialize, Deserialize)]
#[rkyv(crate = libchan::rkyv)]
struct Answer {
    id: u64,
    sum: u64,
    /// How many messages this worker has had from its neighbour in the ring so far.
    heard: u64,
}

/// A worker's place in the ring, in two messages: the end it hears its neighbour on (sent
/// first), then the end it talks to the next worker on.
#[derive(Archive, Serialize, Deserialize)]
#[rkyv(crate = libchan::rkyv)]
enum Link {
    From(Receiver<u64>),
    To(Sender<u64>),
}

/// Set for the worker that connects over TCP: the address to connect to.
const TCP_WORKER: &str = "LIBCHAN_DEMO_TCP";

fn main() -> Result<()> {
    if libchan::is_worker() {
        return work(libchan::parent()?);
    }
    if let Ok(addr) = std::env::var(TCP_WORKER) {
        return work(libchan::connect_with(&addr, &Options::new().shm(false))?);
    }
    let (workers, duration, size) = options()?;
    coordinate(workers, duration, size)
}

/// A worker: answers jobs until the coordinator closes the channel (or goes away).
fn work(parent: Session) -> Result<()> {
    let jobs: Receiver<Job> = parent.accept_channel()?;
    let links: Receiver<Link> = parent.accept_channel()?;
    let (mut from, mut to) = (None, None); // the TCP worker is not in the ring
    for link in links.iter() {
        match &*link {
            ArchivedLink::From(rx) => from = Some(link.take(rx)?),
            ArchivedLink::To(tx) => to = Some(link.take(tx)?),
        }
    }
    let heard = Arc::new(AtomicU64::new(0));
    if let Some(from) = from {
        let heard = heard.clone();
        thread::spawn(move || from.iter().for_each(|_| _ = heard.fetch_add(1, Relaxed)));
    }
    for job in jobs.iter() {
        let reply = job.take(&job.reply)?; // the job's own answer channel
        let sum = match &job.task {
            ArchivedTask::Sum(bytes) => bytes.iter().map(|&b| u64::from(b)).sum(),
            ArchivedTask::Read(fd) => {
                let mut file = std::fs::File::from(job.take(fd)?.into_owned_fd());
                let mut text = Vec::new();
                file.read_to_end(&mut text)?;
                text.len() as u64
            }
        };
        let id = job.id.to_native();
        reply.send(Answer {
            id,
            sum,
            heard: heard.load(Relaxed),
        })?;
        if let Some(next) = &to {
            let _ = next.try_send(id); // if the neighbour is behind, it misses this one
        }
    }
    Ok(())
}

/// The options: `--workers N` (default: one per core), `--duration SECS`, `--size BYTES`.
fn options() -> Result<(usize, Duration, usize)> {
    let mut workers = thread::available_parallelism().map_or(1, |n| n.get());
    let (mut secs, mut size) = (5.0, 1024);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--workers" => workers = value.parse()?,
            "--duration" => secs = value.parse()?,
            "--size" => size = value.parse()?,
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    let duration = Duration::try_from_secs_f64(secs).map_err(|e| format!("--duration: {e}"))?;
    Ok((workers.max(1), duration, size))
}

/// One worker, as the coordinator sees it.
struct Worker {
    name: String,
    cpu: String,
    child: Child,
    transport: String,
    jobs: Sender<Job>,
    links: Sender<Link>,
}

impl Worker {
    fn new(name: String, cpu: String, child: Child, session: Session) -> Result<Worker> {
        let transport = session.transport().to_string();
        println!(
            "worker {name:>3}: pid {}, cpu {cpu}, {transport}",
            child.id()
        );
        // Channels are accepted in the order they were opened: jobs first, then links.
        let (jobs, links) = (session.open_channel()?, session.open_channel()?);
        Ok(Worker {
            name,
            cpu,
            child,
            transport,
            jobs,
            links,
        })
    }
}

fn coordinate(n: usize, duration: Duration, size: usize) -> Result<()> {
    // Ctrl-C only raises this flag: the run then ends as it would when the time is up.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Relaxed))?;
    let exe = std::env::current_exe()?;
    let cpus = allowed_cpus();
    let mut workers = Vec::new();
    for i in 0..n {
        let cpu = cpus[i % cpus.len()];
        let opts = SpawnOptions::new().core(cpu);
        let (child, session) = libchan::spawn_with(worker_command(&exe), &opts)?;
        workers.push(Worker::new(i.to_string(), cpu.to_string(), child, session)?);
    }
    // Channel i of the ring goes from worker i to worker i+1. Handing out the receiving end
    // first and the sending end second lets the two workers talk directly.
    let ring = workers.len();
    if ring > 1 {
        let mut senders = Vec::new();
        for i in 0..ring {
            let (tx, rx) = libchan::pipe::<u64>();
            workers[(i + 1) % ring].links.send(Link::From(rx))?;
            senders.push(tx);
        }
        for (w, tx) in workers.iter().zip(senders) {
            w.links.send(Link::To(tx))?;
        }
    }
    // The same worker code over TCP, shared memory off, and not in the ring.
    let listener = libchan::listen_with("tcp://127.0.0.1:0", &Options::new().shm(false))?;
    let child = worker_command(&exe)
        .env(TCP_WORKER, listener.local_addr()?)
        .spawn()?;
    let session = accept_within(listener, Duration::from_secs(10))?;
    workers.push(Worker::new("tcp".into(), "-".into(), child, session)?);

    // One thread per worker sends it jobs, one at a time, until the time is up or Ctrl-C.
    let (start, count) = (Instant::now(), Arc::new(AtomicU64::new(0)));
    let drivers: Vec<_> = workers
        .into_iter()
        .map(|worker| {
            let (count, stop) = (count.clone(), stop.clone());
            thread::spawn(move || drive(worker, size, &stop, &count))
        })
        .collect();
    while start.elapsed() < duration && !stop.load(Relaxed) {
        thread::sleep(Duration::from_millis(100));
        let part = (start.elapsed().as_secs_f64() / duration.as_secs_f64()).min(1.0);
        let (bar, jobs) = ("#".repeat((part * 40.0) as usize), count.load(Relaxed));
        eprint!("\r[{bar:<40}] {:>3.0}%  {jobs} jobs ", part * 100.0);
    }
    eprintln!();
    // The drivers stop, and close their workers' job channels. Join them all (each reaps its
    // worker) before looking for errors.
    let interrupted = stop.swap(true, Relaxed);
    let rows: Vec<Result<String>> = drivers
        .into_iter()
        .map(|d| d.join().expect("a driver thread panicked"))
        .collect();
    let rows = rows.into_iter().collect::<Result<Vec<_>>>()?;
    if interrupted {
        let secs = start.elapsed().as_secs_f64();
        println!("\ninterrupted by Ctrl-C after {secs:.1} s: the table shows the jobs done so far");
    }
    println!("\nworker  cpu  transport       jobs        MB/s   p50 rtt   p99 rtt  from peer");
    for row in &rows {
        println!("{row}");
    }
    println!("\nall {} workers exited cleanly", rows.len());
    Ok(())
}

/// Sends one worker jobs until `done`: a file to read, then `size`-byte payloads; then closes
/// its job channel and waits for it to exit. Returns its row of the table.
fn drive(w: Worker, size: usize, done: &AtomicBool, count: &AtomicU64) -> Result<String> {
    let (name, jobs, mut child) = (w.name, w.jobs, w.child);
    drop(w.links); // the worker starts on its jobs once its links channel is closed
    let text = b"a file handed to a worker process as a descriptor\n";
    let flags = rustix::fs::MemfdFlags::CLOEXEC;
    let mut file = std::fs::File::from(rustix::fs::memfd_create("libchan-demo", flags)?);
    file.write_all(text)?;
    file.rewind()?;
    // Over TCP the descriptor travels as a byte stream; the worker still gets a descriptor.
    let answer = ask(&jobs, 0, Task::Read(Fd::new(file)))?;
    if answer.sum != text.len() as u64 {
        return Err(format!("worker {name} read the file wrong").into());
    }
    let (start, mut rtts, mut heard) = (Instant::now(), Vec::new(), 0);
    for id in 1.. {
        if done.load(Relaxed) {
            break;
        }
        let byte = id as u8;
        let t0 = Instant::now();
        let answer = ask(&jobs, id, Task::Sum(vec![byte; size]))?;
        rtts.push(t0.elapsed());
        if answer.sum != u64::from(byte) * size as u64 {
            return Err(format!("worker {name}: wrong answer to job {id}").into());
        }
        heard = answer.heard;
        count.fetch_add(1, Relaxed);
    }
    let mb_per_s = (rtts.len() * size) as f64 / start.elapsed().as_secs_f64() / 1e6;
    // The job channel closes here: the worker ends its loop and exits.
    drop(jobs);
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("worker {name} exited with {status}").into());
    }
    rtts.sort();
    let pct = |p: usize| rtts.get(rtts.len() * p / 100).copied().unwrap_or_default();
    let (n, p50, p99) = (rtts.len(), pct(50), pct(99));
    let (cpu, transport) = (w.cpu, w.transport);
    Ok(format!(
        "{name:>6}  {cpu:>3}  {transport:<9}  {n:>9}  {mb_per_s:>10.1}  {p50:>8.1?}  {p99:>8.1?}  {heard:>9}"
    ))
}

/// Sends one job with a fresh answer channel and waits for its answer.
fn ask(jobs: &Sender<Job>, id: u64, task: Task) -> Result<Answer> {
    let (reply, answers) = libchan::pipe();
    jobs.send_checked(Job { id, task, reply })
        .map_err(|(_, e)| format!("job {id}: {e}"))?;
    let answer = answers.recv()?.into_owned()?;
    if answer.id != id {
        return Err(format!("answer to job {} for job {id}", answer.id).into());
    }
    Ok(answer)
}

/// This program again, as a worker, in a process group of its own: the terminal sends Ctrl-C
/// to its foreground group, and only the coordinator should get it.
fn worker_command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.process_group(0);
    cmd
}

/// Accepts one session, giving up after `limit` (the TCP worker may have failed to start).
fn accept_within(listener: libchan::Listener, limit: Duration) -> Result<Session> {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || tx.send(listener.accept()));
    Ok(rx
        .recv_timeout(limit)
        .map_err(|_| "the TCP worker did not connect")??)
}

/// The CPUs this process may run on: a worker is pinned to each in turn.
fn allowed_cpus() -> Vec<usize> {
    let set = rustix::thread::sched_getaffinity(None).expect("sched_getaffinity");
    (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect()
}
