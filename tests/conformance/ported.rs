//! Cases 1 to 11: the behaviour ported from Go libchan's and the Node port's tests.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use libchan::{copy, pipe, ByteStream, Fd, Receiver, RecvTimeoutError, Sender, TakeError};

use crate::harness::{end, join, next, spawn, wait_until, Transport, PATIENCE};

/// A plain struct with no handles.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct Plain {
    id: u64,
    name: String,
    score: f64,
    tags: Vec<String>,
    ok: bool,
}

/// Case 1: A plain struct arrives intact, read in place and deserialized.
pub fn c01_plain_struct<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<Plain>();
    let v = Plain {
        id: 0x0123_4567_89ab_cdef,
        name: "plain ✓".into(),
        score: -1.5e-300,
        tags: vec!["a".into(), String::new(), "ζ".repeat(40)],
        ok: true,
    };
    tx.send(v.clone()).expect("send");
    tx.send(v.clone()).expect("send");
    let m = next(&rx);
    assert_eq!(m.id.to_native(), v.id);
    assert_eq!(m.name.as_str(), v.name);
    assert_eq!(m.score.to_native(), v.score);
    assert_eq!(m.tags.len(), 3);
    assert_eq!(m.tags[2].as_str(), v.tags[2]);
    assert!(m.ok);
    assert_eq!(next(&rx).into_owned().expect("into_owned"), v);
    drop(tx);
    assert_eq!(end(&rx), RecvTimeoutError::Closed);
}

/// Case 1: A 0-byte message (`()`), an empty vector and a 100 000-byte payload arrive intact.
pub fn c01_zero_and_large_payloads<X: Transport>() {
    let t = X::new();
    let (unit_tx, unit_rx) = t.channel::<()>();
    let (tx, rx) = t.channel::<Vec<u8>>();
    let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let expect = big.clone();
    // A helper sends: 100 kB is about a socket buffer on unix, and nobody reads it yet.
    let sender = spawn("sender", move || {
        unit_tx.send(()).expect("send ()");
        tx.send(Vec::new()).expect("send empty");
        tx.send(big).expect("send 100 kB");
    });
    let m = next(&unit_rx);
    assert_eq!(m.as_bytes().len(), 0, "() archives to nothing");
    assert!(next(&rx).is_empty());
    let m = next(&rx);
    assert_eq!(m.as_slice(), &expect[..]);
    join(sender);
    assert_eq!(end(&unit_rx), RecvTimeoutError::Closed);
    assert_eq!(end(&rx), RecvTimeoutError::Closed);
}

/// A request with a reply channel.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Req {
    n: u32,
    reply: Sender<u64>,
}

/// Case 2: Request/reply: each request carries a `Sender`, the server answers on it.
pub fn c02_request_reply<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<Req>();
    let server = spawn("server", move || {
        let mut served = 0;
        for m in rx.iter() {
            let reply = m.take(&m.reply).expect("take reply");
            assert_eq!(m.take(&m.reply).err(), Some(TakeError::Taken));
            if m.n == 0 {
                continue; // dropped unanswered: the client sees its reply channel close
            }
            let n = u64::from(m.n.to_native());
            reply.send(n * n).expect("reply");
            served += 1;
        }
        served
    });
    for n in 1..=100u32 {
        let (reply, replies) = pipe::<u64>();
        tx.send(Req { n, reply }).expect("request");
        assert_eq!(next(&replies).to_native(), u64::from(n) * u64::from(n));
        assert_eq!(end(&replies), RecvTimeoutError::Closed);
    }
    let (reply, replies) = pipe::<u64>();
    tx.send(Req { n: 0, reply }).expect("request");
    assert_eq!(end(&replies), RecvTimeoutError::Closed);
    drop(tx);
    assert_eq!(join(server), 100);
}

/// A `Sender`, a `Receiver` and a byte stream in one message.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Trio {
    to_origin: Sender<String>,
    from_origin: Receiver<String>,
    stream: ByteStream,
}

/// Case 3: A message carries a `Sender`, a `Receiver` and a byte stream at once: all three work,
/// in both directions, with multi-byte UTF-8; every end closes without an error.
pub fn c03_sender_receiver_stream_at_once<X: Transport>() {
    if !X::passes_fds() {
        return;
    }
    const A_TO_B: &str = "A→B: Ελληνικά, 日本語, emoji 🦀🦀";
    const B_TO_A: &str = "B→A: русский, עברית, 𝄞 and NUL \0 too";
    let t = X::new();
    let (tx, rx) = t.channel::<Trio>();
    let (back_tx, back_rx) = pipe::<String>();
    let (fwd_tx, fwd_rx) = pipe::<String>();
    let (mut mine, theirs) = ByteStream::pair().expect("ByteStream::pair");
    tx.send(Trio {
        to_origin: back_tx,
        from_origin: fwd_rx,
        stream: theirs,
    })
    .expect("send trio");

    let peer = spawn("peer", move || {
        let m = next(&rx);
        let to_origin = m.take(&m.to_origin).expect("take sender");
        let from_origin = m.take(&m.from_origin).expect("take receiver");
        let mut stream = m.take(&m.stream).expect("take stream");
        drop(m);
        to_origin.send(B_TO_A.to_string()).expect("send back");
        assert_eq!(next(&from_origin).as_str(), A_TO_B);
        stream.write_all(B_TO_A.as_bytes()).expect("stream write");
        stream.close_write().expect("close_write");
        let mut got = String::new();
        stream.read_to_string(&mut got).expect("stream read");
        assert_eq!(got, A_TO_B);
        drop(to_origin);
        assert_eq!(end(&from_origin), RecvTimeoutError::Closed);
        assert_eq!(end(&rx), RecvTimeoutError::Closed);
    });

    fwd_tx.send(A_TO_B.to_string()).expect("send forward");
    assert_eq!(next(&back_rx).as_str(), B_TO_A);
    mine.write_all(A_TO_B.as_bytes()).expect("stream write");
    mine.close_write().expect("close_write");
    let mut got = String::new();
    mine.read_to_string(&mut got).expect("stream read");
    assert_eq!(got, B_TO_A);
    drop(fwd_tx);
    drop(tx);
    assert_eq!(end(&back_rx), RecvTimeoutError::Closed);
    join(peer);
}

/// Level 1 of case 4: carries the receiver of level 2.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Level1 {
    inner: Receiver<Level2>,
}

/// Level 2 of case 4: carries the receiver of level 3.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Level2 {
    inner: Receiver<Level3>,
    note: String,
}

/// Level 3 of case 4: a value and where to answer.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Level3 {
    value: u64,
    reply: Sender<u64>,
}

/// Case 4: Nesting three levels deep: a `Receiver` sent over a channel that was itself sent, whose
/// messages carry `Sender`s that are answered on. Level 3's messages are sent once the peer
/// holds level 3's receiver (see `c04_receiver_sent_with_queued_messages` for the other order).
pub fn c04_nesting_three_levels<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<Level1>();
    let (l2_tx, l2_rx) = pipe::<Level2>();
    let (l3_tx, l3_rx) = pipe::<Level3>();
    let (reply_tx, reply_rx) = pipe::<u64>();
    tx.send(Level1 { inner: l2_rx }).expect("send level 1");
    l2_tx
        .send(Level2 {
            inner: l3_rx,
            note: "level two".into(),
        })
        .expect("send level 2");
    drop(l2_tx);
    let (ready_tx, ready_rx) = pipe::<()>();
    let (done_tx, done_rx) = pipe::<()>();

    let peer = spawn("peer", move || {
        let m1 = next(&rx);
        let r2 = m1.take(&m1.inner).expect("take level 2");
        let m2 = next(&r2);
        assert_eq!(m2.note.as_str(), "level two");
        let r3 = m2.take(&m2.inner).expect("take level 3");
        ready_tx.send(()).expect("ready");
        for value in 0..10u64 {
            let m3 = next(&r3);
            assert_eq!(m3.value.to_native(), value);
            let reply = m3.take(&m3.reply).expect("take reply");
            reply.send(value + 1000).expect("reply");
        }
        done_tx.send(()).expect("done");
        assert_eq!(end(&r3), RecvTimeoutError::Closed);
        assert_eq!(end(&r2), RecvTimeoutError::Closed);
    });
    next(&ready_rx);
    for value in 0..10 {
        l3_tx
            .send(Level3 {
                value,
                reply: reply_tx.clone(),
            })
            .expect("send level 3");
    }
    drop((l3_tx, reply_tx));
    // Wait for the peer before receiving: a receive that starts before the reply channel has
    // crossed the connection is c04_receiver_waiting_before_its_sender_is_sent.
    next(&done_rx);
    for value in 0..10u64 {
        assert_eq!(next(&reply_rx).to_native(), value + 1000);
    }
    join(peer);
    assert_eq!(end(&reply_rx), RecvTimeoutError::Closed);
}

/// Case 4: A `Receiver` whose channel already holds messages when it is sent: the messages follow
/// it, in order, and none arrives before the receiver itself (checked 200 times).
pub fn c04_receiver_sent_with_queued_messages<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<Level2>();
    let peer = spawn("peer", move || {
        for round in 0..200u64 {
            let m = next(&rx);
            let r3 = m.take(&m.inner).expect("take");
            for value in 0..3 {
                assert_eq!(next(&r3).value.to_native(), round * 10 + value);
            }
            assert_eq!(end(&r3), RecvTimeoutError::Closed);
        }
    });
    let (reply, _replies) = pipe::<u64>();
    for round in 0..200u64 {
        let (l3_tx, l3_rx) = pipe::<Level3>();
        for value in 0..3 {
            l3_tx
                .send(Level3 {
                    value: round * 10 + value,
                    reply: reply.clone(),
                })
                .expect("queue");
        }
        drop(l3_tx);
        tx.send(Level2 {
            inner: l3_rx,
            note: String::new(),
        })
        .expect("send receiver");
    }
    join(peer);
}

/// Case 4 (and 2): A receiver already blocked in `recv` when its `Sender` is sent across the
/// connection still gets what the peer sends on that `Sender`.
pub fn c04_receiver_waiting_before_its_sender_is_sent<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<Sender<u32>>();
    let (reply_tx, reply_rx) = pipe::<u32>();
    let waiter = spawn("waiter", move || {
        reply_rx.recv_timeout(PATIENCE).map(|m| m.to_native())
    });
    std::thread::sleep(Duration::from_millis(50));
    tx.send(reply_tx).expect("send the sender");
    let peer = spawn("peer", move || {
        let m = next(&rx);
        m.take(&*m).expect("take").send(7).expect("reply");
    });
    join(peer);
    assert_eq!(join(waiter), Ok(7));
}

/// Case 5: A `Sender` of `Sender`s: the peer answers with a message that carries another `Sender`,
/// and the first side sends on it.
pub fn c05_sender_of_senders<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<Sender<Sender<u32>>>();
    let (ask_tx, ask_rx) = pipe::<Sender<u32>>();
    tx.send(ask_tx).expect("send a sender of senders");
    let peer = spawn("peer", move || {
        let m = next(&rx);
        let back: Sender<Sender<u32>> = m.take(&*m).expect("take");
        let (val_tx, val_rx) = pipe::<u32>();
        back.send(val_tx.clone()).expect("answer with a sender");
        back.send(val_tx).expect("answer with another");
        drop(back);
        let got: Vec<u32> = (0..2).map(|_| next(&val_rx).to_native()).collect();
        assert_eq!(end(&val_rx), RecvTimeoutError::Closed);
        got
    });
    let first = next(&ask_rx);
    let s1 = first.take(&*first).expect("take the answer");
    s1.send(42).expect("send on it");
    let s2: Sender<u32> = next(&ask_rx).into_owned().expect("into_owned");
    s2.send(43).expect("send on it");
    drop((first, s1, s2));
    assert_eq!(end(&ask_rx), RecvTimeoutError::Closed);
    assert_eq!(join(peer), [42, 43]);
}

/// Case 6: `copy` proxies messages that carry reply channels; the replies flow back through the
/// proxy, and the count it returns is exact.
pub fn c06_copy_proxies_replies<X: Transport>() {
    const N: u32 = 100;
    let t = X::new();
    let (front_tx, front_rx) = t.channel::<Req>();
    let (back_tx, back_rx) = t.channel::<Req>();
    let proxy = spawn("proxy", move || copy(&front_rx, &back_tx));
    let server = spawn("server", move || {
        let mut served = 0u32;
        for m in back_rx.iter() {
            let reply = m.take(&m.reply).expect("take reply");
            reply.send(u64::from(m.n.to_native()) * 2).expect("reply");
            served += 1;
        }
        served
    });
    let (reply, replies) = pipe::<u64>();
    for n in 0..N {
        front_tx
            .send(Req {
                n,
                reply: reply.clone(),
            })
            .expect("request");
        assert_eq!(next(&replies).to_native(), u64::from(n) * 2);
    }
    drop(front_tx);
    assert_eq!(join(proxy), Ok(N as usize), "copy's count");
    assert_eq!(join(server), N);
    drop(reply);
    assert_eq!(end(&replies), RecvTimeoutError::Closed);
}

/// A message carrying a byte stream.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Piped {
    pub id: u32,
    pub stream: ByteStream,
}

/// Case 7: A byte stream inside a proxied message works both ways.
pub fn c07_stream_through_copy<X: Transport>() {
    if !X::passes_fds() {
        return;
    }
    let t = X::new();
    let (front_tx, front_rx) = t.channel::<Piped>();
    let (back_tx, back_rx) = t.channel::<Piped>();
    let proxy = spawn("proxy", move || copy(&front_rx, &back_tx));
    let server = spawn("server", move || {
        for m in back_rx.iter() {
            let id = m.id.to_native();
            let mut s = BufReader::new(m.take(&m.stream).expect("take stream"));
            let mut line = String::new();
            s.read_line(&mut line).expect("read");
            assert_eq!(line, format!("ping {id} ✓\n"));
            s.get_mut()
                .write_all(format!("pong {id} ✗\n").as_bytes())
                .expect("write");
        }
    });
    for id in 0..3 {
        let (mine, theirs) = ByteStream::pair().expect("pair");
        front_tx.send(Piped { id, stream: theirs }).expect("send");
        let mut mine = BufReader::new(mine);
        mine.get_mut()
            .write_all(format!("ping {id} ✓\n").as_bytes())
            .expect("write");
        let mut line = String::new();
        mine.read_line(&mut line).expect("read");
        assert_eq!(line, format!("pong {id} ✗\n"));
    }
    drop(front_tx);
    assert_eq!(join(proxy), Ok(3));
    join(server);
}

/// A message that may carry an fd.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MaybeFd {
    seq: u32,
    fd: Option<Fd>,
}

/// A temporary file holding `content`, already unlinked.
fn temp_file(tag: &str, content: &[u8]) -> File {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "libchan-conformance-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = File::options()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("create temp file");
    std::fs::remove_file(&path).expect("unlink temp file");
    f.write_all(content).expect("write temp file");
    f
}

/// Case 8: An fd attached to the second of three back-to-back messages is bound to that
/// message only.
pub fn c08_fd_bound_to_its_message<X: Transport>() {
    if !X::passes_fds() {
        return;
    }
    const CONTENT: &[u8] = b"the file of message 2 \xe2\x9c\x93";
    let t = X::new();
    // Across a network the fd arrives as a socket that carries the file's bytes from its
    // offset on (PROTOCOL.md section 5.6), not as the same open file.
    let pumped = t.sessions().is_some_and(|(a, _)| {
        use libchan::Transport::{Tcp, Tls, Ws};
        matches!(a.transport(), Tcp | Tls | Ws)
    });
    let (tx, rx) = t.channel::<MaybeFd>();
    let mut file = temp_file(X::name(), CONTENT);
    file.rewind().expect("rewind");
    let inode = file.metadata().expect("metadata").ino();
    tx.send(MaybeFd { seq: 1, fd: None }).expect("send 1");
    tx.send(MaybeFd {
        seq: 2,
        fd: Some(Fd::new(file)),
    })
    .expect("send 2");
    tx.send(MaybeFd { seq: 3, fd: None }).expect("send 3");

    let m1 = next(&rx);
    assert_eq!(m1.seq, 1);
    assert!(m1.fd.is_none(), "message 1 carries no fd");
    let m2 = next(&rx);
    assert_eq!(m2.seq, 2);
    let fd = m2
        .take(m2.fd.as_ref().expect("message 2 carries an fd"))
        .expect("take fd");
    let mut f = File::from(fd.into_owned_fd());
    if !pumped {
        assert_eq!(f.metadata().expect("metadata").ino(), inode, "same file");
        f.rewind().expect("rewind");
    }
    let mut got = Vec::new();
    f.read_to_end(&mut got).expect("read");
    assert_eq!(got, CONTENT);
    let m3 = next(&rx);
    assert_eq!(m3.seq, 3);
    assert!(m3.fd.is_none(), "message 3 carries no fd");
    let owned = m3.into_owned().expect("into_owned");
    assert!(owned.fd.is_none());
}

/// A message carrying a socket.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Sock {
    sock: Fd,
}

/// Case 9: A socket fd passed in a message can be used to talk to the other end.
pub fn c09_socket_fd_talks<X: Transport>() {
    if !X::passes_fds() {
        return;
    }
    let t = X::new();
    let (tx, rx) = t.channel::<Sock>();
    let (mine, theirs) = UnixStream::pair().expect("socketpair");
    mine.set_read_timeout(Some(PATIENCE)).expect("timeout");
    tx.send(Sock {
        sock: Fd::new(theirs),
    })
    .expect("send");
    let peer = spawn("peer", move || {
        let m = next(&rx);
        let s = UnixStream::from(m.take(&m.sock).expect("take").into_owned_fd());
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut r = BufReader::new(&s);
        let mut line = String::new();
        r.read_line(&mut line).expect("read");
        assert_eq!(line, "hello über the fd\n");
        (&s).write_all(b"hi back\n").expect("write");
    });
    (&mine)
        .write_all("hello über the fd\n".as_bytes())
        .expect("write");
    let mut line = String::new();
    BufReader::new(&mine).read_line(&mut line).expect("read");
    assert_eq!(line, "hi back\n");
    join(peer);
}

/// One message of case 10.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Tick {
    pub chan: u32,
    pub seq: u32,
    pub pad: Vec<u8>,
}

/// Case 10: 50 channels with 50 messages each, interleaved, all arrive in order per channel (read
/// channel by channel, so the others buffer meanwhile).
pub fn c10_fifty_channels_interleaved<X: Transport>() {
    const CHANS: u32 = 50;
    const MSGS: u32 = 50;
    let t = X::new();
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..CHANS).map(|_| t.channel::<Tick>()).unzip();
    let sender = spawn("sender", move || {
        for seq in 0..MSGS {
            for (chan, tx) in (0..).zip(&txs) {
                let pad = vec![chan as u8; (chan * 3 + seq) as usize];
                tx.send(Tick { chan, seq, pad }).expect("send");
            }
        }
    });
    for (chan, rx) in (0..).zip(&rxs) {
        for seq in 0..MSGS {
            let m = next(rx);
            assert_eq!((m.chan.to_native(), m.seq.to_native()), (chan, seq));
            assert_eq!(m.pad.len(), (chan * 3 + seq) as usize);
            assert!(m.pad.iter().all(|&b| b == chan as u8));
        }
    }
    join(sender);
    for rx in &rxs {
        assert_eq!(end(rx), RecvTimeoutError::Closed);
    }
}

/// Case 11: Messages sent before the receiver exists (before `accept_channel`) are delivered: a
/// few sent from this thread, then 1000 from a sender that blocks until the receiver comes.
pub fn c11_late_rendezvous<X: Transport>() {
    let t = X::new();
    let (tx, late) = t.late_channel::<u64>();
    for i in 0..10 {
        tx.send(i).expect("send before accept");
    }
    std::thread::sleep(Duration::from_millis(20));
    let rx = late();
    for i in 0..10 {
        assert_eq!(next(&rx).to_native(), i);
    }
    drop(tx);
    assert_eq!(end(&rx), RecvTimeoutError::Closed);

    let (tx, late) = t.late_channel::<u64>();
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let sender = spawn("sender", move || {
        for i in 0..1000 {
            tx.send(i).expect("send before accept");
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    wait_until("50 sends before the accept", || {
        sent.load(Ordering::Relaxed) >= 50
    });
    let rx = late();
    for i in 0..1000 {
        assert_eq!(next(&rx).to_native(), i);
    }
    join(sender);
    assert_eq!(end(&rx), RecvTimeoutError::Closed);
}
