//! Quick end-to-end checks of the core paths.

use libchan::*;
use std::io::{Read, Write};

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Req {
    n: u32,
    reply: Sender<u32>,
    stream: ByteStream,
}

#[test]
fn mem_req_reply() {
    let (tx, rx) = pipe::<Req>();
    let (rtx, rrx) = pipe::<u32>();
    let (mut a, b) = ByteStream::pair().unwrap();
    tx.send(Req {
        n: 1,
        reply: rtx,
        stream: b,
    })
    .unwrap();
    let m = rx.recv().unwrap();
    let r = m.take(&m.reply).unwrap();
    let mut s = m.take(&m.stream).unwrap();
    r.send(m.n.to_native() + 1).unwrap();
    assert_eq!(*rrx.recv().unwrap(), 2);
    s.write_all(b"x").unwrap();
    let mut buf = [0u8; 1];
    a.read_exact(&mut buf).unwrap();
}

#[test]
fn unix_req_reply() {
    let (a, b) = Session::pair().unwrap();
    let tx = a.open_channel::<Req>().unwrap();
    let (rtx, rrx) = pipe::<u32>();
    let (mut sa, sb) = ByteStream::pair().unwrap();
    tx.send(Req {
        n: 41,
        reply: rtx,
        stream: sb,
    })
    .unwrap();
    let t = std::thread::spawn(move || {
        let rx = b.accept_channel::<Req>().unwrap();
        let m = rx.recv().unwrap();
        let r = m.take(&m.reply).unwrap();
        let mut s = m.take(&m.stream).unwrap();
        s.write_all("é".as_bytes()).unwrap();
        r.send(m.n.to_native() + 1).unwrap();
        b
    });
    assert_eq!(*rrx.recv().unwrap(), 42);
    let mut buf = [0u8; 2];
    sa.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, "é".as_bytes());
    let _b = t.join().unwrap();
    drop(tx);
}

#[test]
fn unix_close_and_disconnect() {
    let (a, b) = Session::pair().unwrap();
    let tx = a.open_channel::<u64>().unwrap();
    let t = std::thread::spawn(move || {
        for i in 0..1000 {
            tx.send(i).unwrap();
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    let rx = b.accept_channel::<u64>().unwrap();
    for i in 0..1000 {
        assert_eq!(*rx.recv().unwrap(), i);
    }
    t.join().unwrap();
    assert_eq!(rx.recv().unwrap_err(), RecvError::Closed);
    let tx = a.open_channel::<u64>().unwrap();
    let rx = b.accept_channel::<u64>().unwrap();
    drop(rx);
    let mut failed = false;
    for i in 0..100 {
        if tx.send(i).is_err() {
            failed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(failed);
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Sub {
    reply: Sender<u32>,
}

/// One inbox fed by a local sender and by two sessions at once: every source wakes the
/// receiver, whichever socket it is blocked on.
#[test]
fn mixed_sources_wake_the_receiver() {
    let (a1, b1) = Session::pair().unwrap();
    let (a2, b2) = Session::pair().unwrap();
    let (tx, rx) = pipe::<u32>();
    for (a, b, base) in [(a1, b1, 100u32), (a2, b2, 200u32)] {
        a.open_channel::<Sub>()
            .unwrap()
            .send(Sub { reply: tx.clone() })
            .unwrap();
        std::thread::spawn(move || {
            let subs = b.accept_channel::<Sub>().unwrap();
            let m = subs.recv().unwrap();
            let reply = m.take(&m.reply).unwrap();
            for i in 0..3 {
                std::thread::sleep(std::time::Duration::from_millis(20));
                reply.send(base + i).unwrap();
            }
            drop(a);
        });
    }
    let local = tx.clone();
    std::thread::spawn(move || {
        for i in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(30));
            local.send(i).unwrap();
        }
    });
    drop(tx);
    let mut got = Vec::new();
    while got.len() < 9 {
        match rx.recv_timeout(std::time::Duration::from_secs(5)) {
            Ok(m) => got.push(m.to_native()),
            Err(e) => panic!("after {got:?}: {e}"),
        }
    }
    got.sort();
    assert_eq!(got, [0, 1, 2, 100, 101, 102, 200, 201, 202]);
}

/// A message with more fds than one frame can carry is refused with a clear error, not a
/// panic, and the channel stays usable.
#[test]
fn too_many_fds_in_one_message_is_an_error() {
    let (a, b) = Session::pair().unwrap();
    let tx = a.open_channel::<Vec<Fd>>().unwrap();
    let rx = b.accept_channel::<Vec<Fd>>().unwrap();
    let many: Vec<Fd> = (0..300)
        .map(|_| Fd::new(std::fs::File::open("/dev/null").unwrap()))
        .collect();
    match tx.send_checked(many) {
        Err((
            back,
            Error::TooManyHandles {
                count: 300,
                limit: 253,
            },
        )) => assert_eq!(back.len(), 300),
        other => panic!(
            "expected TooManyHandles, got {:?}",
            other.err().map(|e| e.1)
        ),
    }
    let few: Vec<Fd> = (0..3)
        .map(|_| Fd::new(std::fs::File::open("/dev/null").unwrap()))
        .collect();
    tx.send(few).unwrap();
    let m = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(m.into_owned().unwrap().len(), 3);
}

/// `try_recv` on a channel that a session feeds reads the socket itself: with nobody else
/// reading the session, a polling receiver still gets the message.
#[test]
fn try_recv_alone_reads_the_session() {
    let (a, b) = Session::pair().unwrap();
    let tx = a.open_channel::<u32>().unwrap();
    let rx = b.accept_channel::<u32>().unwrap();
    tx.send(7).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match rx.try_recv() {
            Ok(m) => {
                assert_eq!(*m, 7);
                break;
            }
            Err(TryRecvError::Empty) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => panic!("try_recv never saw the message: {e}"),
        }
    }
    drop(tx);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match rx.try_recv() {
            Err(TryRecvError::Closed) => break,
            Err(TryRecvError::Empty) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            other => panic!("expected Closed, got {:?}", other.err()),
        }
    }
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Hold {
    tx: Sender<u64>,
}

/// A receiver blocked reading a session (its channel has a sender over there) wakes for a
/// message from a sender in its own process: that first local message makes the channel's
/// ring, which the receiver must start reading at once. It used to go on reading the socket
/// until the session delivered something or the wait ran out.
#[test]
fn local_send_wakes_a_receiver_reading_a_session() {
    let listener = listen_with("tcp://127.0.0.1:0", &Options::new().shm(false)).unwrap();
    let addr = listener.local_addr().unwrap();
    let tcp = std::thread::spawn(move || connect_with(&addr, &Options::new().shm(false)));
    let server = listener.accept().unwrap();
    let tcp_pair = (tcp.join().unwrap().unwrap(), server);
    let unix_pair = Session::pair_with(&Options::new().shm(false)).unwrap();
    for (a, b) in [unix_pair, tcp_pair] {
        let (tx, rx) = pipe::<u64>();
        let hold = a.open_channel::<Hold>().unwrap();
        hold.send(Hold { tx: tx.clone() }).unwrap();
        let held = b.accept_channel::<Hold>().unwrap().recv().unwrap();
        // The peer keeps a sender: the receiver below reads the session while it waits.
        let _remote = held.take(&held.tx).unwrap();
        let receiver = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let got = rx.recv_timeout(std::time::Duration::from_secs(20));
            (got.map(|m| m.to_native()), start.elapsed())
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        tx.send(5).unwrap();
        let (got, took) = receiver.join().unwrap();
        assert_eq!(got, Ok(5), "{}", a.transport());
        // A liveness bound, far above any wake-up: the old behaviour waited out the 20 s.
        assert!(
            took < std::time::Duration::from_secs(10),
            "{}: took {took:?}",
            a.transport()
        );
    }
}

/// A sender sizes its in-place writes by the messages before it: after a run of one size it
/// reserves exactly that size, so a larger message must still go through (encoded aside
/// once), and smaller and larger ones after it too, in order.
#[test]
fn message_sizes_that_change_after_a_steady_run() {
    fn check(tx: Sender<Vec<u8>>, rx: Receiver<Vec<u8>>) {
        let sizes: Vec<usize> = [vec![64; 20], vec![65, 64, 3000, 64, 64, 1, 0, 64, 4096]].concat();
        let t = std::thread::spawn(move || {
            for (i, &n) in sizes.iter().enumerate() {
                tx.send(vec![i as u8; n]).unwrap();
            }
            sizes
        });
        let mut got = Vec::new();
        while let Ok(m) = rx.recv_timeout(std::time::Duration::from_secs(10)) {
            got.push(m.to_vec());
        }
        let sizes = t.join().unwrap();
        assert_eq!(got.len(), sizes.len());
        for (i, (m, &n)) in got.iter().zip(&sizes).enumerate() {
            assert_eq!(m.len(), n, "message {i}");
            assert!(m.iter().all(|&b| b == i as u8), "message {i}");
        }
    }
    let (tx, rx) = pipe::<Vec<u8>>();
    check(tx, rx);
    let (a, b) = Session::pair().unwrap();
    assert_eq!(a.transport(), Transport::Shm);
    let tx = a.open_channel::<Vec<u8>>().unwrap();
    let rx = b.accept_channel::<Vec<u8>>().unwrap();
    check(tx, rx);
}
