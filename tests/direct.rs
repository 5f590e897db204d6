//! Direct paths: a process that hands the two ends of a channel to two other processes on this
//! host introduces them to each other, so their messages skip it and it may exit.
//!
//! The test binary re-executes itself as the other processes (`LIBCHAN_DIRECT_ROLE` names the
//! role, `LIBCHAN_DIRECT_ADDR` the creator's address, `LIBCHAN_DIRECT_ID` a peer's number,
//! `LIBCHAN_DIRECT_PAIRS` the channels the creator hands out); `child_entry` is a no-op in the
//! parent run. Every child is killed and reaped when its test ends, and exits on its own after
//! a while.

mod common;

use common::{eventually, fresh_addr, with_timeout};

use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use libchan::rkyv::{Archive, Deserialize, Serialize};
use libchan::{Options, Receiver, RecvTimeoutError, Sender, Session};

/// A child gives up after this long whatever it is doing.
const CHILD_WATCHDOG: Duration = Duration::from_secs(30);

/// Generous bound on any single wait in these tests.
const PATIENCE: Duration = Duration::from_secs(10);

/// One message on a direct channel.
#[derive(Archive, Serialize, Deserialize, Debug)]
struct Item {
    from: u32,
    seq: u32,
}

/// The creator hands a peer the receiving end of the channel from peer `from`.
#[derive(Archive, Serialize, Deserialize)]
struct RxHand {
    from: u32,
    rx: Receiver<Item>,
}

/// The creator hands a peer the sending end of the channel to peer `to`.
#[derive(Archive, Serialize, Deserialize)]
struct TxHand {
    to: u32,
    tx: Sender<Item>,
}

/// Child processes, killed and reaped on drop.
struct Kids(Vec<Child>);

impl Kids {
    fn new() -> Self {
        Kids(Vec::new())
    }

    /// Starts a child in `role`; returns its index.
    fn spawn(&mut self, role: &str, vars: &[(&str, String)]) -> usize {
        let exe = std::env::current_exe().expect("path of the test binary");
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env("LIBCHAN_DIRECT_ROLE", role)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        self.0.push(cmd.spawn().expect("spawn the child"));
        self.0.len() - 1
    }

    /// Waits for child `i` to exit, at most `limit`.
    fn wait(&mut self, i: usize, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0[i].try_wait().expect("wait for a child") {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "child {i} did not exit in {limit:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self, i: usize) {
        let _ = self.0[i].kill();
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

/// `from>to` pairs, comma separated: the channels the creator hands out.
fn parse_pairs(s: &str) -> Vec<(u32, u32)> {
    s.split(',')
        .map(|p| {
            let (a, b) = p.split_once('>').expect("a pair is FROM>TO");
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect()
}

fn all_pairs(n: u32) -> String {
    let mut pairs = Vec::new();
    for from in 0..n {
        for to in 0..n {
            if from != to {
                pairs.push(format!("{from}>{to}"));
            }
        }
    }
    pairs.join(",")
}

/// Starts a creator child that listens on a fresh address, waits for `peers` peers, hands out
/// `pairs`, and exits once its relays are gone. Returns its index and address.
fn spawn_creator(kids: &mut Kids, peers: u32, pairs: &str) -> (usize, String) {
    let addr = fresh_addr("libchan-direct-test");
    let i = kids.spawn(
        "creator",
        &[
            ("LIBCHAN_DIRECT_ADDR", addr.clone()),
            ("LIBCHAN_DIRECT_PEERS", peers.to_string()),
            ("LIBCHAN_DIRECT_PAIRS", pairs.to_string()),
        ],
    );
    (i, addr)
}

fn connect_retrying(addr: &str) -> Session {
    let start = Instant::now();
    loop {
        match libchan::connect(addr) {
            Ok(s) => return s,
            Err(e) => {
                assert!(start.elapsed() < PATIENCE, "cannot reach {addr}: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// What a peer was handed: receivers by sending peer, senders by receiving peer.
struct Handed {
    session: Session,
    rxs: Vec<(u32, Receiver<Item>)>,
    txs: Vec<(u32, Sender<Item>)>,
}

/// Connects to the creator as peer `id` and takes the `rxs` receivers and `txs` senders it
/// hands over.
fn join_creator(addr: &str, id: u32, rxs: usize, txs: usize) -> Handed {
    let session = connect_retrying(addr);
    session.open_channel::<u32>().unwrap().send(id).unwrap();
    let rx_hands = session.accept_channel_timeout::<RxHand>(PATIENCE).unwrap();
    let tx_hands = session.accept_channel_timeout::<TxHand>(PATIENCE).unwrap();
    let rxs = (0..rxs)
        .map(|_| {
            let m = rx_hands.recv_timeout(PATIENCE).unwrap();
            (m.from.to_native(), m.take(&m.rx).unwrap())
        })
        .collect();
    let txs = (0..txs)
        .map(|_| {
            let m = tx_hands.recv_timeout(PATIENCE).unwrap();
            (m.to.to_native(), m.take(&m.tx).unwrap())
        })
        .collect();
    Handed { session, rxs, txs }
}

impl Handed {
    /// Waits until the creator is gone (its session ended).
    fn creator_gone(&self) {
        assert!(
            eventually(PATIENCE, || self.session.is_closed()),
            "the creator's session is still open"
        );
    }
}

/// Receives `n` items in order from `from` on `rx`.
fn receive_in_order(rx: &Receiver<Item>, from: u32, n: u32) {
    for seq in 0..n {
        let m = rx
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|e| panic!("item {seq} from peer {from}: {e:?}"));
        assert_eq!((m.from.to_native(), m.seq.to_native()), (from, seq));
    }
}

/// The creator hands peer 1 a sender and this process (peer 0) the receiver, then exits; the
/// 10 000 messages peer 1 sends afterwards all arrive, in order, and the channel then closes
/// cleanly when peer 1 drops its sender.
#[test]
fn direct_path_outlives_the_creator() {
    with_timeout(Duration::from_secs(30), || {
        let mut kids = Kids::new();
        let (creator, addr) = spawn_creator(&mut kids, 2, "1>0");
        kids.spawn(
            "sender",
            &[
                ("LIBCHAN_DIRECT_ADDR", addr.clone()),
                ("LIBCHAN_DIRECT_COUNT", "10000".into()),
            ],
        );
        let handed = join_creator(&addr, 0, 1, 0);
        // The creator exits successfully only once every channel of its sessions is closed,
        // its relay included: nothing it could carry is left.
        let status = kids.wait(creator, PATIENCE);
        assert!(status.success(), "creator failed: {status}");
        handed.creator_gone();
        let (from, rx) = &handed.rxs[0];
        assert_eq!(*from, 1);
        receive_in_order(rx, 1, 10_000);
        assert_eq!(
            rx.recv_timeout(PATIENCE).map(|_| ()),
            Err(RecvTimeoutError::Closed)
        );
    });
}

/// Three workers, a channel for every ordered pair of them from one creator, which exits
/// before any of them sends: every worker's messages reach every other, in order.
#[test]
fn mesh_of_three_workers_after_the_creator_exits() {
    with_timeout(Duration::from_secs(30), || {
        const N: u32 = 3;
        const EACH: u32 = 1000;
        let mut kids = Kids::new();
        let (creator, addr) = spawn_creator(&mut kids, N, &all_pairs(N));
        let workers: Vec<usize> = (1..N)
            .map(|id| {
                kids.spawn(
                    "worker",
                    &[
                        ("LIBCHAN_DIRECT_ADDR", addr.clone()),
                        ("LIBCHAN_DIRECT_ID", id.to_string()),
                        ("LIBCHAN_DIRECT_PEERS", N.to_string()),
                        ("LIBCHAN_DIRECT_COUNT", EACH.to_string()),
                    ],
                )
            })
            .collect();
        let handed = join_creator(&addr, 0, (N - 1) as usize, (N - 1) as usize);
        let status = kids.wait(creator, PATIENCE);
        assert!(status.success(), "creator failed: {status}");
        run_worker(&handed, 0, EACH);
        for w in workers {
            let status = kids.wait(w, PATIENCE);
            assert!(status.success(), "worker {w} failed: {status}");
        }
    });
}

/// A worker's part of the mesh: once the creator is gone, `each` items to every other worker,
/// then `each` from every other worker, in order.
fn run_worker(handed: &Handed, id: u32, each: u32) {
    handed.creator_gone();
    for (_, tx) in &handed.txs {
        for seq in 0..each {
            tx.send(Item { from: id, seq }).unwrap();
        }
    }
    for (from, rx) in &handed.rxs {
        receive_in_order(rx, *from, each);
    }
}

/// SIGKILL of the sending process after the direct path is up (and the creator gone) wakes the
/// receiver with `Disconnected`, not a hang.
#[test]
fn killing_the_sender_disconnects_the_receiver() {
    with_timeout(Duration::from_secs(30), || {
        let mut kids = Kids::new();
        let (creator, addr) = spawn_creator(&mut kids, 2, "1>0");
        let sender = kids.spawn(
            "sender",
            &[
                ("LIBCHAN_DIRECT_ADDR", addr.clone()),
                ("LIBCHAN_DIRECT_COUNT", "100".into()),
                ("LIBCHAN_DIRECT_LINGER", "1".into()),
            ],
        );
        let handed = join_creator(&addr, 0, 1, 0);
        assert!(kids.wait(creator, PATIENCE).success());
        let rx = &handed.rxs[0].1;
        receive_in_order(rx, 1, 100);
        kids.kill(sender);
        let start = Instant::now();
        assert_eq!(
            rx.recv_timeout(PATIENCE).map(|_| ()),
            Err(RecvTimeoutError::Disconnected)
        );
        assert!(start.elapsed() < Duration::from_secs(5), "death seen late");
    });
}

/// In one process, with sessions standing in for the three processes: the creator closes both
/// of its sessions outright, and the two ends keep talking (only a direct path survives that).
#[test]
fn creator_closing_its_sessions_leaves_the_direct_path() {
    with_timeout(Duration::from_secs(20), || {
        let (to_c, at_c) = Session::pair().unwrap();
        let (to_b, at_b) = Session::pair().unwrap();
        let hands_c = to_c.open_channel::<RxHand>().unwrap();
        let hands_b = to_b.open_channel::<TxHand>().unwrap();
        let (tx, rx) = libchan::pipe::<Item>();
        hands_c.send(RxHand { from: 1, rx }).unwrap();
        hands_b.send(TxHand { to: 0, tx }).unwrap();
        drop((hands_c, hands_b));

        let c = thread::spawn(move || {
            let hands = at_c.accept_channel_timeout::<RxHand>(PATIENCE).unwrap();
            let m = hands.recv_timeout(PATIENCE).unwrap();
            let rx = m.take(&m.rx).unwrap();
            (at_c, rx)
        });
        let hands = at_b.accept_channel_timeout::<TxHand>(PATIENCE).unwrap();
        let m = hands.recv_timeout(PATIENCE).unwrap();
        let tx = m.take(&m.tx).unwrap();
        let (at_c, rx) = c.join().unwrap();

        // The creator's relay closed once its last sender left: nothing of ours remains on
        // either of its sessions.
        assert!(eventually(PATIENCE, || to_c.channel_count() == 0
            && to_b.channel_count() == 0));
        to_c.close();
        to_b.close();
        assert!(eventually(PATIENCE, || at_c.is_closed() && at_b.is_closed()));

        let b = thread::spawn(move || {
            for seq in 0..2000 {
                tx.send(Item { from: 1, seq }).unwrap();
            }
        });
        receive_in_order(&rx, 1, 2000);
        b.join().unwrap();
        assert_eq!(
            rx.recv_timeout(PATIENCE).map(|_| ()),
            Err(RecvTimeoutError::Closed)
        );
    });
}

/// Over a session without shared memory there is no introduction: the sender is relayed by
/// the creator as before, so closing the creator's sessions breaks the channel.
#[test]
fn without_shared_memory_the_creator_still_relays() {
    with_timeout(Duration::from_secs(20), || {
        let (to_c, at_c) = Session::pair().unwrap();
        let (to_b, at_b) = Session::pair_with(&Options::new().shm(false)).unwrap();
        let hands_c = to_c.open_channel::<RxHand>().unwrap();
        let hands_b = to_b.open_channel::<TxHand>().unwrap();
        let (tx, rx) = libchan::pipe::<Item>();
        hands_c.send(RxHand { from: 1, rx }).unwrap();
        hands_b.send(TxHand { to: 0, tx }).unwrap();
        drop((hands_c, hands_b));

        let c = thread::spawn(move || {
            let hands = at_c.accept_channel_timeout::<RxHand>(PATIENCE).unwrap();
            let m = hands.recv_timeout(PATIENCE).unwrap();
            let rx = m.take(&m.rx).unwrap();
            (at_c, rx)
        });
        let b = thread::spawn(move || {
            let hands = at_b.accept_channel_timeout::<TxHand>(PATIENCE).unwrap();
            let m = hands.recv_timeout(PATIENCE).unwrap();
            let tx = m.take(&m.tx).unwrap();
            for seq in 0..100 {
                tx.send(Item { from: 1, seq }).unwrap();
            }
            (at_b, tx)
        });
        let (_at_c, rx) = c.join().unwrap();
        receive_in_order(&rx, 1, 100);
        // The relay is still there: the creator's session to C keeps a channel.
        assert!(to_c.channel_count() > 0);
        to_c.close();
        assert_eq!(
            rx.recv_timeout(PATIENCE).map(|_| ()),
            Err(RecvTimeoutError::Disconnected)
        );
        drop(b.join().unwrap());
    });
}

/// A JOIN that answers no introduction this process accepted is a protocol violation: the
/// session ends with a GOAWAY saying so.
#[test]
fn join_without_an_introduction_is_refused() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    with_timeout(Duration::from_secs(20), || {
        let (mut raw, lib) = UnixStream::pair().unwrap();
        raw.set_read_timeout(Some(PATIENCE)).unwrap();
        let libside =
            thread::spawn(move || Session::from_unix_stream(lib, libchan::Role::Acceptor));
        // The reference defaults, with FDS and SHM.
        let mut hello = [0u8; 32];
        hello[0..4].copy_from_slice(b"LCHN");
        hello[4..6].copy_from_slice(&1u16.to_le_bytes());
        hello[8..16].copy_from_slice(&3u64.to_le_bytes());
        hello[16..20].copy_from_slice(&16_842_752u32.to_le_bytes());
        hello[20..24].copy_from_slice(&16_777_216u32.to_le_bytes());
        hello[24..28].copy_from_slice(&262_144u32.to_le_bytes());
        hello[28..32].copy_from_slice(&65_536u32.to_le_bytes());
        raw.write_all(&hello).unwrap();
        let mut theirs = [0u8; 32];
        raw.read_exact(&mut theirs).unwrap();
        let session = libside.join().unwrap().unwrap();
        assert_eq!(session.transport(), libchan::Transport::Shm);

        // JOIN (kind 13): channel 1, token 7, a fingerprint.
        let mut join = Vec::new();
        join.extend_from_slice(&8u32.to_le_bytes());
        join.extend_from_slice(&[13, 0, 0, 0]);
        join.extend_from_slice(&1u32.to_le_bytes());
        join.extend_from_slice(&7u32.to_le_bytes());
        join.extend_from_slice(&libchan::fingerprint::<Item>().to_le_bytes());
        raw.write_all(&join).unwrap();

        let mut bytes = Vec::new();
        let _ = raw.read_to_end(&mut bytes);
        assert!(bytes.len() >= 16, "no GOAWAY");
        assert_eq!(bytes[4], 8, "the last frame is a GOAWAY");
        assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 1);
        let text = String::from_utf8_lossy(&bytes[16..]);
        assert!(text.contains("answers no introduction"), "{text}");
        assert!(eventually(PATIENCE, || session.is_closed()));
    });
}

// ---------------------------------------------------------------------------------------------
// The child side
// ---------------------------------------------------------------------------------------------

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

#[test]
fn child_entry() {
    let Ok(role) = std::env::var("LIBCHAN_DIRECT_ROLE") else {
        return;
    };
    let addr = var("LIBCHAN_DIRECT_ADDR");
    thread::spawn(|| {
        thread::sleep(CHILD_WATCHDOG);
        std::process::exit(3);
    });
    match role.as_str() {
        "creator" => creator(&addr),
        "sender" => {
            let count: u32 = var("LIBCHAN_DIRECT_COUNT").parse().unwrap();
            let handed = join_creator(&addr, 1, 0, 1);
            handed.creator_gone();
            let (to, tx) = handed.txs.into_iter().next().unwrap();
            assert_eq!(to, 0);
            for seq in 0..count {
                tx.send(Item { from: 1, seq }).unwrap();
            }
            if std::env::var("LIBCHAN_DIRECT_LINGER").is_err() {
                // Close the channel, and stay until the parent has seen the close.
                drop(tx);
            }
            thread::sleep(CHILD_WATCHDOG);
        }
        "worker" => {
            let id: u32 = var("LIBCHAN_DIRECT_ID").parse().unwrap();
            let peers: usize = var("LIBCHAN_DIRECT_PEERS").parse().unwrap();
            let each: u32 = var("LIBCHAN_DIRECT_COUNT").parse().unwrap();
            let handed = join_creator(&addr, id, peers - 1, peers - 1);
            run_worker(&handed, id, each);
        }
        other => panic!("unknown child role {other}"),
    }
}

/// The creator's session to one peer, with the channels it hands ends over.
type PeerLink = (Session, Sender<RxHand>, Sender<TxHand>);

/// Waits for every peer, hands out a channel per pair (the receiving end first, then the
/// sending end), and returns once no channel of its sessions is left open (its relays ended).
fn creator(addr: &str) {
    let peers: u32 = var("LIBCHAN_DIRECT_PEERS").parse().unwrap();
    let pairs = parse_pairs(&var("LIBCHAN_DIRECT_PAIRS"));
    let listener = libchan::listen(addr).unwrap();
    let mut sessions: Vec<Option<PeerLink>> = (0..peers).map(|_| None).collect();
    for _ in 0..peers {
        let s = listener.accept().unwrap();
        let ids = s.accept_channel_timeout::<u32>(PATIENCE).unwrap();
        let id = ids.recv_timeout(PATIENCE).unwrap().to_native();
        drop(ids);
        let rxs = s.open_channel::<RxHand>().unwrap();
        let txs = s.open_channel::<TxHand>().unwrap();
        sessions[id as usize] = Some((s, rxs, txs));
    }
    let sessions: Vec<_> = sessions.into_iter().map(Option::unwrap).collect();
    let mut senders = Vec::new();
    for &(from, to) in &pairs {
        let (tx, rx) = libchan::pipe::<Item>();
        sessions[to as usize].1.send(RxHand { from, rx }).unwrap();
        senders.push((from, to, tx));
    }
    for (from, to, tx) in senders {
        sessions[from as usize].2.send(TxHand { to, tx }).unwrap();
    }
    let sessions: Vec<Session> = sessions.into_iter().map(|(s, _, _)| s).collect();
    assert!(
        eventually(PATIENCE, || sessions.iter().all(|s| s.channel_count() == 0)),
        "the creator still has channels open: {:?}",
        sessions
            .iter()
            .map(Session::channel_count)
            .collect::<Vec<_>>()
    );
}
