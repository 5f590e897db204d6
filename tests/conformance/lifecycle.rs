//! Closing, disconnecting and isolation: cases 13 to 17, 22 (in-process) and 24.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use libchan::{
    pipe, ByteStream, Error, Receiver, RecvError, RecvTimeoutError, SendError, SendTimeoutError,
    Sender, TryRecvError, TrySendError,
};

use crate::harness::{end, join, next, spawn, wait_until, Transport, PATIENCE};
use crate::ported::{Piped, Tick};

/// A kibibyte numbered in its first four bytes.
fn kib(i: u32) -> Vec<u8> {
    let mut v = vec![(i % 251) as u8; 1024];
    v[..4].copy_from_slice(&i.to_le_bytes());
    v
}

fn kib_number(v: &[u8]) -> u32 {
    u32::from_le_bytes(v[..4].try_into().expect("numbered"))
}

/// Case 13: 2000 unread 1 KiB messages on channel A do not delay a message on channel B: it
/// arrives while A's sender is still held back by A's flow control. A's sender tries 6000, more
/// than any transport's per-channel bound (a 256 KiB window, a 4 MiB ring), so that it is held
/// back whatever the transport.
pub fn c13_isolation_from_a_full_channel<X: Transport>() {
    const N: u32 = 6000;
    let t = X::new();
    let (a_tx, a_rx) = t.channel::<Vec<u8>>();
    let (b_tx, b_rx) = t.channel::<String>();
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let a_sender = spawn("a-sender", move || {
        for i in 0..N {
            a_tx.send(kib(i)).expect("send on A");
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    wait_until("A's sender to get going", || {
        sent.load(Ordering::Relaxed) >= 40
    });
    let b_sender = spawn("b-sender", move || {
        b_tx.send("through B".into()).expect("send on B");
    });
    assert_eq!(next(&b_rx).as_str(), "through B");
    let a_sent = sent.load(Ordering::Relaxed);
    assert!(
        a_sent < N as usize,
        "A's sender finished all {N} sends with nobody reading A (no flow control?)"
    );
    join(b_sender);
    assert_eq!(end(&b_rx), RecvTimeoutError::Closed);
    for i in 0..N {
        assert_eq!(kib_number(&next(&a_rx)), i);
    }
    join(a_sender);
    assert_eq!(end(&a_rx), RecvTimeoutError::Closed);
}

/// Case 14: A blocked `recv` wakes when the last sender goes (`Closed`), and a `send` blocked on a
/// full channel wakes when the receiver goes (`Disconnected`, with the message).
pub fn c14_blocked_calls_wake_on_close<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<u32>();
    let waiter = spawn("recv", move || rx.recv().map(|m| m.to_native()));
    std::thread::sleep(Duration::from_millis(30));
    drop(tx);
    assert_eq!(join(waiter), Err(RecvError::Closed));

    // Something keeps reading the receiving side (a server thread waiting on another channel
    // of the same connection), as in a real peer.
    let (keep_tx, keep_rx) = t.channel::<u32>();
    let keeper = spawn("keeper", move || keep_rx.recv_timeout(PATIENCE).is_ok());
    let (tx, rx) = t.channel::<Vec<u8>>();
    // Full for good: a send that cannot complete in 200 ms with the reading side running.
    let mut filled = 0u32;
    loop {
        match tx.send_timeout(kib(filled), Duration::from_millis(200)) {
            Ok(()) => filled += 1,
            Err(SendTimeoutError::Timeout(back)) => {
                assert_eq!(kib_number(&back), filled);
                break;
            }
            Err(SendTimeoutError::Disconnected(_)) => panic!("disconnected while filling"),
        }
        assert!(filled < 100_000, "the channel never fills");
    }
    let blocked = spawn("send", move || tx.send(kib(1_000_000)).map_err(|e| e.0));
    std::thread::sleep(Duration::from_millis(30));
    drop(rx);
    match join(blocked) {
        Err(back) => assert_eq!(kib_number(&back), 1_000_000),
        Ok(()) => panic!("send succeeded after the receiver was dropped"),
    }
    keep_tx.send(1).expect("keeper");
    assert!(join(keeper));
}

/// Case 14: `accept_channel` (blocked, or called later) and a blocked `recv` return an error
/// promptly once the peer session is closed or dropped.
pub fn c14_accept_fails_after_peer_closes<X: Transport>() {
    let t = X::new();
    let Some((a, b)) = t.sessions() else { return };
    let (tx, rx) = t.channel::<u32>();
    let b2 = b.clone();
    let accepter = spawn("accept", move || b2.accept_channel::<u32>().err());
    let receiver = spawn("recv", move || rx.recv().err());
    std::thread::sleep(Duration::from_millis(30));
    a.close();
    assert!(matches!(join(accepter), Some(Error::Disconnected)));
    assert_eq!(join(receiver), Some(RecvError::Disconnected));
    assert!(matches!(
        b.accept_channel_timeout::<u32>(PATIENCE),
        Err(Error::Disconnected)
    ));
    assert!(b.is_closed() && a.is_closed());
    assert!(b.close_reason().is_some());
    assert!(matches!(a.open_channel::<u32>(), Err(Error::Disconnected)));
    assert!(tx.is_disconnected());

    // Dropping the peer (its session and every channel on it) does the same.
    let t2 = X::new();
    let (a2, b2) = t2.sessions().expect("same transport");
    drop(t2);
    let accepter = spawn("accept", move || {
        let r = b2.accept_channel::<u32>().err();
        (r, b2.close_reason())
    });
    std::thread::sleep(Duration::from_millis(30));
    drop(a2);
    let (err, reason) = join(accepter);
    assert!(matches!(err, Some(Error::Disconnected)), "{err:?}");
    assert!(reason.is_some());
}

/// The last message of case 15: a channel in each direction.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Last {
    reply: Sender<String>,
    feed: Receiver<String>,
}

/// Case 15: Channels nested in the last message before a graceful close (the sender dropped, and
/// with it, on session transports, the whole connection) are delivered and usable.
pub fn c15_nested_channel_in_last_message<X: Transport>() {
    let (tx, rx) = X::channel_alone::<Last>();
    let (reply_tx, reply_rx) = pipe::<String>();
    let (feed_tx, feed_rx) = pipe::<String>();
    tx.send(Last {
        reply: reply_tx,
        feed: feed_rx,
    })
    .expect("send last");
    drop(tx);
    feed_tx.send("sent after the close".into()).expect("feed");
    drop(feed_tx);

    let peer = spawn("peer", move || {
        let m = next(&rx);
        let reply = m.take(&m.reply).expect("take reply");
        let feed = m.take(&m.feed).expect("take feed");
        drop(m);
        assert_eq!(end(&rx), RecvTimeoutError::Closed);
        drop(rx);
        reply.send("usable".into()).expect("reply after close");
        assert_eq!(next(&feed).as_str(), "sent after the close");
        assert_eq!(end(&feed), RecvTimeoutError::Closed);
    });
    assert_eq!(next(&reply_rx).as_str(), "usable");
    join(peer);
    assert_eq!(end(&reply_rx), RecvTimeoutError::Closed);
}

/// Sends numbered messages until one fails (bounded); returns the failing number and the
/// message the error carried.
fn send_until_refused(tx: &Sender<String>) -> (u32, String) {
    for i in 0..200u32 {
        match tx.send(format!("message {i} ✓")) {
            Ok(()) => std::thread::sleep(Duration::from_millis(2)),
            Err(SendError(back)) => return (i, back),
        }
    }
    panic!("200 sends over 400 ms succeeded after the receiver was dropped");
}

/// Every send flavour on a disconnected sender fails at once and hands the message back.
fn all_sends_refused(tx: &Sender<String>) {
    assert!(tx.is_disconnected());
    assert_eq!(tx.send("a".into()).unwrap_err().0, "a");
    match tx.try_send("b".into()) {
        Err(TrySendError::Disconnected(back)) => assert_eq!(back, "b"),
        other => panic!("try_send: {other:?}"),
    }
    match tx.send_timeout("c".into(), PATIENCE) {
        Err(SendTimeoutError::Disconnected(back)) => assert_eq!(back, "c"),
        other => panic!("send_timeout: {other:?}"),
    }
    match tx.send_checked("d".into()) {
        Err((back, Error::Disconnected)) => assert_eq!(back, "d"),
        Err((_, e)) => panic!("send_checked: {e:?}"),
        Ok(()) => panic!("send_checked succeeded"),
    }
}

/// Case 16: `send` after the receiver is gone returns an error carrying the message, within a
/// bounded number of sends; every later send fails too.
pub fn c16_send_after_receiver_gone<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<String>();
    tx.send("first".into()).expect("send");
    assert_eq!(next(&rx).as_str(), "first");
    drop(rx);
    let (i, back) = send_until_refused(&tx);
    assert_eq!(back, format!("message {i} ✓"));
    all_sends_refused(&tx);
}

/// A message carrying a sender.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Carrier {
    to: Sender<String>,
}

/// Case 16: The same for a `Sender` that was received in a message, once its receiver (back at the
/// origin) is dropped.
pub fn c16_nested_sender_after_receiver_gone<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<Carrier>();
    let (to_tx, to_rx) = pipe::<String>();
    tx.send(Carrier { to: to_tx }).expect("send");
    let m = next(&rx);
    let to = m.take(&m.to).expect("take");
    to.send("reaches the origin".into()).expect("send nested");
    assert_eq!(next(&to_rx).as_str(), "reaches the origin");
    drop(to_rx);
    let (i, back) = send_until_refused(&to);
    assert_eq!(back, format!("message {i} ✓"));
    all_sends_refused(&to);
}

/// Case 16: On session transports: after `Session::close`, sends fail at once with the message.
pub fn c16_send_after_session_close<X: Transport>() {
    let t = X::new();
    let Some((a, _b)) = t.sessions() else { return };
    let (tx, rx) = t.channel::<String>();
    a.close();
    all_sends_refused(&tx);
    assert_eq!(end(&rx), RecvTimeoutError::Disconnected);
}

/// Case 17: Closing twice is harmless: dropping clones one by one, receiving after the end, closing
/// a byte stream's write side twice, and closing a session twice.
pub fn c17_closing_twice<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<String>();
    let (tx2, tx3) = (tx.clone(), tx.clone());
    drop(tx);
    drop(tx2);
    tx3.send("from the last clone".into()).expect("send");
    assert_eq!(next(&rx).as_str(), "from the last clone");
    drop(tx3);
    assert_eq!(end(&rx), RecvTimeoutError::Closed);
    assert_eq!(end(&rx), RecvTimeoutError::Closed);
    assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Closed);
    assert_eq!(rx.recv().unwrap_err(), RecvError::Closed);

    if X::passes_fds() {
        let (mut mine, theirs) = ByteStream::pair().expect("pair");
        let (stx, srx) = t.channel::<Piped>();
        stx.send(Piped {
            id: 0,
            stream: theirs,
        })
        .expect("send");
        let m = next(&srx);
        let mut s = m.take(&m.stream).expect("take");
        s.write_all("bye ✓".as_bytes()).expect("write");
        s.close_write().expect("close_write");
        s.close_write().expect("close_write again");
        let mut got = String::new();
        mine.read_to_string(&mut got).expect("read to EOF");
        assert_eq!(got, "bye ✓");
    }

    if let Some((a, b)) = t.sessions() {
        let (tx, rx) = t.channel::<String>();
        a.close();
        a.close();
        b.close();
        b.close();
        assert!(a.is_closed() && b.is_closed());
        assert!(a.close_reason().is_some());
        assert_eq!(end(&rx), RecvTimeoutError::Disconnected);
        assert!(tx.send("x".into()).is_err());
        drop((tx, rx));
        a.close();
    }
}

/// Case 22 (in process): Handles in messages that are never received, or received and never
/// taken, are closed: the other end of a byte stream reads EOF, a nested channel ends.
pub fn c22_unread_handles_are_closed<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<Piped>();
    let (ctx, crx) = t.channel::<Carrier>();
    let (fence_tx, fence_rx) = t.channel::<u8>();
    let (to_tx, to_rx) = pipe::<String>();
    ctx.send(Carrier { to: to_tx }).expect("send carrier");
    let mut ends = Vec::new();
    if X::passes_fds() {
        for id in [1, 2] {
            let (mine, theirs) = ByteStream::pair().expect("pair");
            tx.send(Piped { id, stream: theirs }).expect("send");
            let mine = mine.into_unix_stream();
            mine.set_read_timeout(Some(PATIENCE)).expect("timeout");
            ends.push(mine);
        }
    }
    // Received after the others: they have left the connection and wait in their receivers.
    fence_tx.send(1).expect("fence");
    assert_eq!(*next(&fence_rx), 1);

    drop(crx); // the carrier is never received
    assert_eq!(end(&to_rx), RecvTimeoutError::Closed);
    if X::passes_fds() {
        let m = next(&rx);
        assert_eq!(m.id, 1);
        drop(m); // received, its stream never taken
        drop(rx); // message 2 is never received
        for (id, mut mine) in (1..).zip(ends) {
            let mut buf = [0u8; 1];
            match mine.read(&mut buf) {
                Ok(0) => {}
                other => panic!("stream of message {id}: expected EOF, got {other:?}"),
            }
        }
    }
}

/// A pair of nested channel ends.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Ends {
    pub s: Sender<u32>,
    pub r: Receiver<u32>,
}

/// Case 22 (in process): On session transports the connection's channel tables shrink back once
/// channels, and the channels nested in their messages, are closed.
pub fn c22_tables_shrink<X: Transport>() {
    let t = X::new();
    let baseline = t.channel_count();
    let mut held = Vec::new();
    for i in 0..20u32 {
        let (tx, rx) = t.channel::<Ends>();
        let (s, back) = pipe::<u32>();
        let (forth, r) = pipe::<u32>();
        tx.send(Ends { s, r }).expect("send");
        forth.send(i).expect("forth");
        let m = next(&rx);
        let s = m.take(&m.s).expect("take s");
        let r = m.take(&m.r).expect("take r");
        assert_eq!(next(&r).to_native(), i);
        s.send(i + 100).expect("back");
        assert_eq!(next(&back).to_native(), i + 100);
        held.push((tx, rx, s, r, back, forth));
    }
    if let (Some(before), Some(during)) = (baseline, t.channel_count()) {
        assert!(during >= before + 20 * 3, "{during} channels tracked");
    }
    drop(held);
    if let Some(before) = baseline {
        let mut now = usize::MAX;
        wait_until("the channel tables to shrink", || {
            now = t.channel_count().expect("tables");
            now == before
        });
    }
}

/// Case 24: A graceful close delivers every message sent before it: 100 sent and closed before
/// anyone reads.
pub fn c24_graceful_close_delivers_all<X: Transport>() {
    let (tx, rx) = X::channel_alone::<Tick>();
    for seq in 0..100 {
        tx.send(Tick {
            chan: 0,
            seq,
            pad: vec![1; seq as usize % 7],
        })
        .expect("send");
    }
    drop(tx);
    std::thread::sleep(Duration::from_millis(20));
    for seq in 0..100 {
        assert_eq!(next(&rx).seq, seq);
    }
    assert_eq!(end(&rx), RecvTimeoutError::Closed);
}

/// Case 24: The same while the receiver is reading: 3000 messages, the sender then drops its last
/// handle on the connection (CLOSE, GOAWAY) while this side is still receiving and granting
/// credit; every message must arrive, then `Closed`.
pub fn c24_close_while_receiving_delivers_all<X: Transport>() {
    let (tx, rx) = X::channel_alone::<Tick>();
    let sender = spawn("sender", move || {
        for seq in 0..3000 {
            let pad = vec![2; (seq as usize * 13) % 3000];
            tx.send(Tick { chan: 1, seq, pad }).expect("send");
        }
    });
    for seq in 0..3000u32 {
        let m = next(&rx);
        assert_eq!(m.seq, seq);
        assert_eq!(m.pad.len(), (seq as usize * 13) % 3000);
    }
    join(sender);
    assert_eq!(end(&rx), RecvTimeoutError::Closed);
}

/// 11 and 24 together, on session transports: a peer opens a channel, sends, and closes its
/// connection gracefully before this side accepts the channel; the accept and every message
/// must still arrive. (mem has no accept step: c24_graceful_close_delivers_all covers it.)
pub fn c24_close_before_accept_delivers<X: Transport>() {
    let t = X::new();
    if t.sessions().is_none() {
        return;
    }
    let (tx, late) = t.late_channel::<u64>();
    for i in 0..10 {
        tx.send(i).expect("send before accept");
    }
    drop(tx); // the sending side's connection closes: nothing else holds it
    std::thread::sleep(Duration::from_millis(20));
    let rx = late();
    for i in 0..10 {
        assert_eq!(next(&rx).to_native(), i);
    }
    assert_eq!(end(&rx), RecvTimeoutError::Closed);
}
