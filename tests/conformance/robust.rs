//! Validation, field types, load, limits and flow control: cases 18 to 21, 23 and 26.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libchan::rkyv::rancor::Fallible;
use libchan::rkyv::{Archive, Deserialize, Place, Serialize};
use libchan::{
    fingerprint, pipe, Error, Receiver, RecvError, RecvTimeoutError, SendError, Sender,
    TrySendError,
};

use crate::harness::{end, join, next, spawn, wait_until, Transport, PATIENCE};
use crate::wire;

/// A `bool` whose serializer writes any byte it holds: how a buggy or hostile sender (or a
/// corrupted buffer) produces an archive that fails validation, through the public API.
pub struct RawBool(u8);

impl Archive for RawBool {
    type Archived = bool;
    type Resolver = ();

    fn resolve(&self, _: (), out: Place<bool>) {
        // SAFETY: `out` points to the one byte of the archived `bool` inside the serializer's
        // buffer, valid for writes. Writing it through a `*mut u8` never creates a `bool` value:
        // the buffer is only ever read as bytes, and the receiver validates it before use.
        unsafe { out.ptr().cast::<u8>().write(self.0) }
    }
}

impl<S: Fallible + ?Sized> Serialize<S> for RawBool {
    fn serialize(&self, _: &mut S) -> Result<(), S::Error> {
        Ok(())
    }
}

impl<D: Fallible + ?Sized> Deserialize<RawBool, D> for bool {
    fn deserialize(&self, _: &mut D) -> Result<RawBool, D::Error> {
        Ok(RawBool(u8::from(*self)))
    }
}

/// A message whose `flag` may be made invalid.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Flagged {
    n: u32,
    flag: RawBool,
    reply: Sender<u32>,
}

/// Case 18: A message that fails validation is reported (`Invalid`), its handles are closed, and
/// the next message on the channel is read correctly.
pub fn c18_invalid_message_then_next<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<Flagged>();
    let (reply, replies) = pipe::<u32>();
    let (lost, lost_rx) = pipe::<u32>();
    let send = |n, flag, reply: &Sender<u32>| {
        tx.send(Flagged {
            n,
            flag: RawBool(flag),
            reply: reply.clone(),
        })
        .expect("send");
    };
    send(1, 1, &reply);
    send(2, 2, &lost); // invalid: a bool of 2
    send(3, 0, &reply);
    send(4, 0xff, &lost); // invalid
    send(5, 1, &reply);
    drop(lost);
    let ok = |m: libchan::Msg<Flagged>, n: u32| {
        assert_eq!(m.n, n);
        m.take(&m.reply).expect("take").send(n).expect("reply");
    };
    ok(next(&rx), 1);
    match rx.recv_timeout(PATIENCE) {
        Err(RecvTimeoutError::Invalid(e)) => assert!(!format!("{e:?}").is_empty()),
        Err(e) => panic!("expected Invalid, got {e:?}"),
        Ok(_) => panic!("an invalid archive was accepted"),
    }
    ok(next(&rx), 3);
    match rx.recv() {
        Err(RecvError::Invalid(_)) => {}
        Err(e) => panic!("expected Invalid, got {e:?}"),
        Ok(_) => panic!("an invalid archive was accepted"),
    }
    ok(next(&rx), 5);
    // The senders inside the invalid messages were closed with them.
    assert_eq!(end(&lost_rx), RecvTimeoutError::Closed);
    drop(tx);
    assert_eq!(end(&rx), RecvTimeoutError::Closed);
    drop(reply);
    let got: Vec<u32> = std::iter::from_fn(|| replies.recv_timeout(PATIENCE).ok())
        .map(|m| m.to_native())
        .collect();
    assert_eq!(got, [1, 3, 5]);
}

/// A plain message for the wire-level cases.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Flags {
    n: u32,
    flag: bool,
}

fn archive_of(v: &Flags) -> Vec<u8> {
    libchan::rkyv::to_bytes::<libchan::rkyv::rancor::Error>(v)
        .expect("archive")
        .to_vec()
}

/// Case 18: The same when the invalid archive comes straight off the wire from a peer that wrote
/// its frames by hand: reported, and the next message reads correctly.
pub fn c18_invalid_archive_from_the_wire<X: Transport>() {
    let Some((mut raw, session)) = X::raw_peer() else {
        return;
    };
    let one = archive_of(&Flags { n: 1, flag: true });
    let t2 = archive_of(&Flags { n: 2, flag: true });
    let f2 = archive_of(&Flags { n: 2, flag: false });
    let at = (0..t2.len())
        .find(|&i| t2[i] != f2[i])
        .expect("the flag's byte");
    let mut bad = t2.clone();
    bad[at] = 2;
    let three = archive_of(&Flags { n: 3, flag: false });
    let mut out = wire::open(1, fingerprint::<Flags>());
    for payload in [&one, &bad, &three] {
        out.extend_from_slice(&wire::data(1, payload));
    }
    raw.write_all(&out).expect("write frames");
    let rx = session
        .accept_channel_timeout::<Flags>(PATIENCE)
        .expect("accept");
    let m = next(&rx);
    assert_eq!((m.n.to_native(), m.flag), (1, true));
    assert!(matches!(
        rx.recv_timeout(PATIENCE),
        Err(RecvTimeoutError::Invalid(_))
    ));
    let m = next(&rx);
    assert_eq!((m.n.to_native(), m.flag), (3, false));
    drop(raw);
    assert_eq!(end(&rx), RecvTimeoutError::Disconnected);
}

/// Every kind of variant.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub enum Shape {
    Empty,
    Circle(f64),
    Rect { w: u32, h: u32 },
    Named(String, Vec<u8>),
}

/// A nested struct.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct Inner {
    label: String,
    values: Vec<i64>,
}

/// One field of every type a message may hold (handles are covered by the other cases).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct Everything {
    now_nanos: u64,
    now_nanos_wide: u128,
    before_epoch_nanos: i128,
    elapsed: Duration,
    small: (i8, i16, i32, i64),
    big: (u8, u16, u32, u64, u128),
    f32_val: f32,
    f64_val: f64,
    neg_zero: f64,
    inf: f64,
    nan: f64,
    flag: bool,
    ch: char,
    text: String,
    empty: String,
    bytes: Vec<u8>,
    shapes: Vec<Shape>,
    some: Option<u32>,
    none: Option<String>,
    nested: Inner,
    boxed: Box<Inner>,
    tuple: (u8, String, f32),
    array: [u16; 5],
    map: BTreeMap<String, u32>,
    unit: (),
}

fn everything() -> Everything {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970");
    Everything {
        now_nanos: now.as_nanos() as u64,
        now_nanos_wide: now.as_nanos(),
        before_epoch_nanos: -1_234_567_890_123_456_789_012,
        elapsed: Duration::new(u64::MAX / 3, 999_999_999),
        small: (i8::MIN, i16::MIN, i32::MIN, i64::MIN),
        big: (u8::MAX, u16::MAX, u32::MAX, u64::MAX, u128::MAX),
        f32_val: f32::MIN_POSITIVE,
        f64_val: std::f64::consts::PI,
        neg_zero: -0.0,
        inf: f64::NEG_INFINITY,
        nan: f64::from_bits(0x7ff8_dead_beef_0001),
        flag: true,
        ch: '🦀',
        text: "ünïcödé ✓ 日本 \0 tab\t 𝄞".into(),
        empty: String::new(),
        bytes: (0..=255).collect(),
        shapes: vec![
            Shape::Empty,
            Shape::Circle(-2.5),
            Shape::Rect { w: 3, h: u32::MAX },
            Shape::Named("tri".into(), vec![0, 1, 2]),
        ],
        some: Some(0xdead_beef),
        none: None,
        nested: Inner {
            label: "inner".into(),
            values: vec![i64::MIN, -1, 0, 1, i64::MAX],
        },
        boxed: Box::new(Inner {
            label: "boxed".repeat(10),
            values: Vec::new(),
        }),
        tuple: (7, "tuple".into(), -0.125),
        array: [1, 2, 3, 0xfffe, 0xffff],
        map: [
            ("a".to_string(), 1),
            ("ü".to_string(), 2),
            (String::new(), 3),
        ]
        .into_iter()
        .collect(),
        unit: (),
    }
}

/// Case 19: Timestamps and every other field type round-trip exactly: read in place and through
/// `into_owned` (float bits compared, so NaN payloads and -0.0 count).
pub fn c19_field_types_round_trip<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<Everything>();
    let v = everything();
    tx.send(v.clone()).expect("send");
    tx.send(v.clone()).expect("send");

    let m = next(&rx);
    assert_eq!(m.now_nanos, v.now_nanos);
    assert_eq!(m.now_nanos_wide, v.now_nanos_wide);
    assert_eq!(m.before_epoch_nanos, v.before_epoch_nanos);
    assert_eq!(m.elapsed.as_secs(), v.elapsed.as_secs());
    assert_eq!(m.elapsed.subsec_nanos(), v.elapsed.subsec_nanos());
    assert_eq!(m.small.0, i8::MIN);
    assert_eq!(m.small.3, i64::MIN);
    assert_eq!(m.big.4, u128::MAX);
    assert_eq!(m.nan.to_native().to_bits(), v.nan.to_bits());
    assert_eq!(m.neg_zero.to_native().to_bits(), (-0.0f64).to_bits());
    assert_eq!(m.inf, f64::NEG_INFINITY);
    assert!(m.flag);
    assert_eq!(m.ch, '🦀');
    assert_eq!(m.text.as_str(), v.text);
    assert_eq!(m.bytes.as_slice(), &v.bytes[..]);
    assert!(matches!(
        m.shapes[2],
        ArchivedShape::Rect { w, h } if w == 3 && h == u32::MAX
    ));
    assert_eq!(m.some.as_ref().map(|x| x.to_native()), Some(0xdead_beef));
    assert!(m.none.is_none());
    assert_eq!(m.nested.values[0], i64::MIN);
    assert_eq!(m.boxed.label.as_str(), v.boxed.label);
    assert_eq!(m.tuple.1.as_str(), "tuple");
    assert_eq!(m.array[4], 0xffff);
    assert_eq!(m.map.len(), 3);

    let owned = next(&rx).into_owned().expect("into_owned");
    assert_eq!(owned.nan.to_bits(), v.nan.to_bits());
    assert_eq!(owned.neg_zero.to_bits(), v.neg_zero.to_bits());
    assert_eq!(owned.f32_val.to_bits(), v.f32_val.to_bits());
    let without_nan = |mut e: Everything| {
        e.nan = 0.0;
        e
    };
    assert_eq!(without_nan(owned), without_nan(v));
}

/// A job of case 20: two nested handles.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Job {
    id: u32,
    input: Receiver<u64>,
    reply: Sender<(u32, u64)>,
}

/// Case 20: 1000 messages, each carrying two nested handles, all resolve under load (a sender
/// thread, a server thread, and this thread collecting the replies, all at once). Each job's
/// input is sent after the job; `c04_receiver_sent_with_queued_messages` covers the other order.
pub fn c20_thousand_messages_two_handles<X: Transport>() {
    const N: u32 = 1000;
    let t = X::new();
    let (tx, rx) = t.channel::<Job>();
    let (reply, replies) = pipe::<(u32, u64)>();
    let client = spawn("client", move || {
        for id in 0..N {
            let (input_tx, input) = pipe::<u64>();
            tx.send(Job {
                id,
                input,
                reply: reply.clone(),
            })
            .expect("job");
            input_tx.send(u64::from(id) * 3).expect("input");
        }
    });
    let server = spawn("server", move || {
        let mut served = 0;
        for m in rx.iter() {
            let input = m.take(&m.input).expect("take input");
            let reply = m.take(&m.reply).expect("take reply");
            let x = next(&input).to_native();
            assert_eq!(end(&input), RecvTimeoutError::Closed);
            reply.send((m.id.to_native(), x)).expect("reply");
            served += 1;
        }
        served
    });
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let m = next(&replies);
        let (id, x) = (m.0.to_native(), m.1.to_native());
        assert_eq!(x, u64::from(id) * 3);
        assert!(
            !std::mem::replace(&mut seen[id as usize], true),
            "reply {id} twice"
        );
    }
    join(client);
    assert_eq!(join(server), N);
    assert_eq!(end(&replies), RecvTimeoutError::Closed);
}

/// Case 21: A channel that nobody accepts, filled to its limit, does not block the channels nested
/// in the messages of another channel on the same connection.
pub fn c21_unaccepted_channel_does_not_block<X: Transport>() {
    // Far above any transport's per-channel bound (a 256 KiB window, a 4 MiB ring).
    const X_MSGS: usize = 6000;
    let t = X::new();
    let (tx, rx) = t.channel::<crate::lifecycle::Ends>();
    let (x_tx, x_keep) = t.unaccepted::<Vec<u8>>();
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let x_sender = spawn("x-sender", move || {
        while counter.load(Ordering::Relaxed) < X_MSGS && x_tx.send(vec![9; 1024]).is_ok() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    wait_until("the unaccepted channel to fill", || {
        sent.load(Ordering::Relaxed) >= 40
    });
    let peer = spawn("peer", move || {
        for m in rx.iter() {
            let s = m.take(&m.s).expect("take s");
            let r = m.take(&m.r).expect("take r");
            let x = next(&r).to_native();
            s.send(x + 1).expect("answer");
        }
    });
    for i in 0..20u32 {
        let (s, back) = pipe::<u32>();
        let (forth, r) = pipe::<u32>();
        tx.send(crate::lifecycle::Ends { s, r }).expect("send");
        forth.send(i).expect("forth");
        assert_eq!(next(&back).to_native(), i + 1);
    }
    assert!(
        sent.load(Ordering::Relaxed) < X_MSGS,
        "the unaccepted channel took {X_MSGS} KiB unread (no flow control?)"
    );
    drop(tx);
    join(peer);
    drop(x_keep); // unblocks the sender: its channel's far end goes away
    join(x_sender);
}

/// Case 23: A large message (4 MiB, 16 times a unix channel's window) passes intact.
pub fn c23_large_message<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<Vec<u8>>();
    let big: Vec<u8> = (0..4u32 << 20).map(|i| (i ^ (i >> 9)) as u8).collect();
    let expect = big.clone();
    let sender = spawn("sender", move || tx.send(big).map_err(|e| e.0.len()));
    let m = next(&rx);
    assert!(m.as_slice() == &expect[..], "4 MiB payload differs");
    assert_eq!(join(sender), Ok(()));
}

/// Case 23: A message over the transport's limit is refused at send with `TooLarge` (size and
/// limit), the message is handed back, and the channel stays usable; one just under the limit
/// passes. Skipped for mem, whose limit (2 GiB) is too large to allocate in a test.
pub fn c23_too_large_refused_at_send<X: Transport>() {
    let Some(limit) = X::max_message() else {
        return;
    };
    let t = X::new();
    let (tx, rx) = t.channel::<Vec<u8>>();
    match tx.send_checked(vec![7; limit + 1]) {
        Err((back, Error::TooLarge { size, limit: l })) => {
            assert_eq!(back.len(), limit + 1);
            assert_eq!(l, limit);
            assert!(size > limit, "size {size} <= limit {limit}");
        }
        Err((_, e)) => panic!("expected TooLarge, got {e:?}"),
        Ok(()) => panic!("a message over the limit was sent"),
    }
    let SendError(back) = tx.send(vec![8; limit + 4096]).expect_err("over the limit");
    assert_eq!(back.len(), limit + 4096);
    assert!(!tx.is_disconnected(), "a refused message broke the channel");

    let near = limit - 64;
    let sender = spawn("sender", move || {
        tx.send(vec![9; near]).map_err(|e| e.0.len())?;
        tx.send(vec![1, 2, 3]).map_err(|e| e.0.len())
    });
    let m = next(&rx);
    assert_eq!(m.len(), near);
    assert!(m.iter().all(|&b| b == 9));
    assert_eq!(next(&rx).as_slice(), [1, 2, 3]);
    assert_eq!(join(sender), Ok(()));
    assert_eq!(end(&rx), RecvTimeoutError::Closed);
}

/// Opens channel 1 (of `Vec<u8>`) from the raw peer and accepts it.
fn open_and_accept(raw: &mut crate::harness::Raw, session: &libchan::Session) -> Receiver<Vec<u8>> {
    raw.write_all(&wire::open(1, fingerprint::<Vec<u8>>()))
        .expect("write OPEN");
    session
        .accept_channel_timeout::<Vec<u8>>(PATIENCE)
        .expect("accept")
}

/// Case 23: The receiving side enforces the limit too: a peer that sends a DATA frame whose payload
/// is over the negotiated maximum gets its session closed with a reason (and a GOAWAY), and
/// the channel reports `Disconnected`.
pub fn c23_oversized_data_closes_peer_session<X: Transport>() {
    let Some((mut raw, session)) = X::raw_peer() else {
        return;
    };
    let limit = X::max_message().expect("a wire transport has a limit");
    let rx = open_and_accept(&mut raw, &session);
    raw.write_all(&wire::header(limit as u32 + 1, wire::DATA, 1, 0))
        .expect("write");
    let mut writer = raw.try_clone().expect("clone");
    // The body, from another thread: the session may stop reading at any point.
    let body = spawn("body", move || {
        let _ = writer.write_all(&vec![0u8; limit + 1]);
    });
    assert_eq!(end(&rx), RecvTimeoutError::Disconnected);
    assert!(session.is_closed());
    let reason = session.close_reason().expect("a reason");
    assert!(
        reason.contains("exceed") || reason.contains("large") || reason.contains("limit"),
        "unclear reason: {reason}"
    );
    let goaway = wire::read_goaway(&mut raw);
    assert!(goaway.is_some(), "no GOAWAY before the session closed");
    drop(raw);
    join(body);
}

/// Case 23: PROTOCOL.md section 10: a peer that exceeded a negotiated limit gets GOAWAY with
/// reason 2 (limits exceeded), not 1.
pub fn c23_limit_violation_goaway_reason<X: Transport>() {
    let Some((mut raw, session)) = X::raw_peer() else {
        return;
    };
    let rx = open_and_accept(&mut raw, &session);
    raw.write_all(&wire::header(16_842_752 + 1, wire::DATA, 1, 0))
        .expect("write");
    assert_eq!(end(&rx), RecvTimeoutError::Disconnected);
    let (code, text) = wire::read_goaway(&mut raw).expect("GOAWAY");
    assert_eq!(code, 2, "GOAWAY reason for a frame over max_frame ({text})");
}

/// Case 23: A frame header announcing a body over `max_frame` is rejected as soon as the header
/// arrives, without waiting for a body that never comes.
pub fn c23_oversized_header_rejected_at_once<X: Transport>() {
    let Some((mut raw, session)) = X::raw_peer() else {
        return;
    };
    let rx = open_and_accept(&mut raw, &session);
    raw.write_all(&wire::header(u32::MAX, wire::DATA, 1, 0))
        .expect("write");
    assert_eq!(end(&rx), RecvTimeoutError::Disconnected);
    assert!(session.close_reason().is_some());
    assert!(wire::read_goaway(&mut raw).is_some(), "no GOAWAY");
}

/// Case 26: A slow receiver keeps the sender's memory bounded: `try_send` reports `Full` (with the
/// message) after a bounded number of messages, and succeeds again once the receiver drains.
pub fn c26_try_send_fills_then_drains<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<Vec<u8>>();
    let mut accepted = 0u32;
    let back = loop {
        let mut msg = vec![3u8; 1024];
        msg[..4].copy_from_slice(&accepted.to_le_bytes());
        match tx.try_send(msg) {
            Ok(()) => accepted += 1,
            Err(TrySendError::Full(back)) => break back,
            Err(TrySendError::Disconnected(_)) => panic!("disconnected"),
        }
        // Above any transport's per-channel bound (a 256 KiB window, a 4 MiB ring).
        assert!(
            accepted < 8192,
            "8 MiB buffered for a receiver that reads nothing"
        );
    };
    assert!(accepted > 0);
    assert_eq!(back[..4], accepted.to_le_bytes());
    for i in 0..accepted {
        assert_eq!(next(&rx)[..4], i.to_le_bytes());
    }
    let mut retry = Some(back);
    wait_until("try_send to succeed after draining", || {
        match tx.try_send(retry.take().expect("message")) {
            Ok(()) => true,
            Err(e) => {
                retry = Some(e.into_inner());
                false
            }
        }
    });
    assert_eq!(next(&rx)[..4], accepted.to_le_bytes());
}

/// Case 26: A blocking `send` to a receiver that reads nothing blocks after a bounded number of
/// messages, and completes once the receiver reads.
pub fn c26_blocking_send_waits_for_receiver<X: Transport>() {
    // Above any transport's per-channel bound (a 256 KiB window, a 4 MiB ring).
    const N: u32 = 6000;
    let t = X::new();
    let (tx, rx) = t.channel::<Vec<u8>>();
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let sender = spawn("sender", move || {
        for i in 0..N {
            let mut msg = vec![4u8; 1024];
            msg[..4].copy_from_slice(&i.to_le_bytes());
            tx.send(msg).expect("send");
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    wait_until("the sender to get going", || {
        sent.load(Ordering::Relaxed) >= 40
    });
    std::thread::sleep(Duration::from_millis(100));
    let blocked_at = sent.load(Ordering::Relaxed);
    assert!(
        blocked_at < N as usize,
        "all {N} KiB were buffered for a receiver that reads nothing"
    );
    for i in 0..N {
        assert_eq!(next(&rx)[..4], i.to_le_bytes());
    }
    join(sender);
    assert_eq!(end(&rx), RecvTimeoutError::Closed);
}

/// Case 27 (libchan's loans): bytes written in place through `Sender::<Vec<u8>>::loan` arrive
/// as `Vec<u8>` messages, in order with plain sends, at every size (in a ring record, or, when
/// larger than a ring's share, through the buffered path); a loan dropped uncommitted sends
/// nothing and does not hold the channel up.
pub fn c27_loans_arrive_in_order<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<Vec<u8>>();
    let sizes = [0usize, 1, 5, 64, 4095, 100 << 10, 600 << 10];
    let fill =
        |n: usize, seed: usize| -> Vec<u8> { (0..n).map(|i| (i * 7 + seed * 13) as u8).collect() };
    let peer = spawn("loans", move || {
        for (k, &n) in sizes.iter().enumerate() {
            let mut loan = tx.loan(n).expect("loan");
            assert_eq!(loan.len(), n);
            loan.copy_from_slice(&fill(n, k));
            if k == 2 {
                // Dropped: nothing sent, and what follows is not held up.
                let mut gone = tx.loan(32).expect("second loan");
                gone.fill(0xee);
                drop(gone);
            }
            loan.commit().expect("commit");
            tx.send(vec![k as u8; 3]).expect("plain send after a loan");
        }
    });
    for (k, &n) in sizes.iter().enumerate() {
        let m = next(&rx);
        assert_eq!(m.len(), n, "loan {k}");
        assert!(m.as_slice() == fill(n, k).as_slice(), "loan {k}'s bytes");
        assert_eq!(next(&rx).as_slice(), [k as u8; 3]);
    }
    join(peer);
    assert_eq!(end(&rx), RecvTimeoutError::Closed);
}

/// Case 28 (libchan's rings): a receiver may keep received messages and still get the next
/// ones. Each round it holds 65 messages (a quarter of a shared-memory ring, several in-process
/// rings' worth, one 3 MiB) before it drops them in a scrambled order; six rounds go through,
/// so room that a ring did not give back, or a wrap that held it, would stall the sender.
pub fn c28_held_messages_do_not_stall_the_sender<X: Transport>() {
    let t = X::new();
    let (tx, rx) = t.channel::<Vec<u8>>();
    const ROUNDS: u8 = 6;
    const PER_ROUND: u8 = 65;
    let len = |i: u8| if i == 32 { 3 << 20 } else { 16 << 10 };
    let fill = |round: u8, i: u8| round.wrapping_mul(31) ^ i;
    let peer = spawn("held", move || {
        for round in 0..ROUNDS {
            for i in 0..PER_ROUND {
                tx.send(vec![fill(round, i); len(i)]).expect("send");
            }
        }
    });
    for round in 0..ROUNDS {
        let mut held: Vec<_> = (0..PER_ROUND)
            .map(|i| {
                let m = next(&rx);
                assert_eq!(m.len(), len(i), "round {round}, message {i}");
                let want = fill(round, i);
                assert!(m.iter().all(|&x| x == want), "round {round}, message {i}");
                Some(m)
            })
            .collect();
        // Every third first, then the rest from the back.
        for i in (0..held.len()).step_by(3).chain((0..held.len()).rev()) {
            drop(held[i].take());
        }
    }
    join(peer);
    assert_eq!(end(&rx), RecvTimeoutError::Closed);
}

/// Case 29: several threads receive from one channel. Each message goes to one of them; a
/// receiver busy with a message does not keep the others from the next ones, however they
/// wait; and every one of them sees the channel's end. (A ring wakes one sleeper for a batch:
/// threads asleep on it at once must not lose a wake-up.)
pub fn c29_receiving_threads_share_a_channel<X: Transport>() {
    const THREADS: u64 = 3;
    const MESSAGES: u64 = 50;
    let t = X::new();
    let (tx, rx) = t.channel::<u64>();
    let rx = Arc::new(rx);
    let (got, seen) = std::sync::mpsc::channel::<u64>();
    let (hold, held) = std::sync::mpsc::channel::<()>();
    let held = Arc::new(std::sync::Mutex::new(held));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (rx, got, held) = (rx.clone(), got.clone(), held.clone());
            spawn("receiver", move || {
                let mut n = 0;
                while let Ok(m) = rx.recv() {
                    let v = m.to_native();
                    drop(m);
                    got.send(v).unwrap();
                    n += 1;
                    if v == 0 {
                        // Busy with message 0 until the others have received the rest.
                        held.lock().unwrap().recv().unwrap();
                    }
                }
                n
            })
        })
        .collect();
    drop(got);
    // Let the receivers go to sleep before each burst, so they are woken, not caught spinning.
    std::thread::sleep(Duration::from_millis(20));
    tx.send(0).expect("send");
    assert_eq!(seen.recv_timeout(PATIENCE), Ok(0));
    std::thread::sleep(Duration::from_millis(20));
    let mut all = vec![false; MESSAGES as usize];
    all[0] = true;
    for i in 1..MESSAGES {
        tx.send(i).expect("send");
        if i % 10 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    for _ in 1..MESSAGES {
        let v = seen
            .recv_timeout(PATIENCE)
            .expect("a message waited while one receiver was busy");
        assert!(!std::mem::replace(&mut all[v as usize], true), "{v} twice");
    }
    hold.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    drop(tx);
    let total: u64 = threads.into_iter().map(join).sum();
    assert_eq!(total, MESSAGES);
}
