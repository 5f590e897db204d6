//! Entry points for the fuzz targets in `fuzz/` (enabled by the `fuzzing` feature).
//!
//! Each function takes arbitrary bytes and drives one protocol decoder with them. None of
//! them may panic on any input, except where noted: a panic is a bug the fuzzer reports.

use crate::message::{self, Bytes, Validated};
use crate::proto::decoder::Decoder;
use crate::proto::frame::{self, Kind};
use crate::proto::handshake::Handshake;
use crate::{ByteStream, Fd, Sender};

/// A small `max_frame` so the fuzzer reaches the limit checks without huge allocations.
const FUZZ_MAX_FRAME: u32 = 64 * 1024;

/// Feeds `data` to a frame decoder in chunks and drains every frame, parsing each body.
///
/// The first byte picks the chunk size (1 to 256 bytes); the rest is the stream. No fds are
/// passed, errors end the run. Never panics.
pub fn decode_frames(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let _ = decode_chunked(stream, usize::from(first) + 1, &mut |_| {});
}

/// Like [`decode_frames`], and also decodes the stream in one read and checks that both runs
/// yield the same frames and the same error.
///
/// # Panics
///
/// Only if chunking changes the decoder's output, which is a bug.
pub fn decode_frames_differential(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let mut chunked = Vec::new();
    let chunked_end = decode_chunked(stream, usize::from(first) + 1, &mut |f| chunked.push(f));
    let mut whole = Vec::new();
    let whole_end = decode_chunked(stream, stream.len().max(1), &mut |f| whole.push(f));
    assert_eq!(chunked, whole, "chunking changed the frames");
    assert_eq!(chunked_end, whole_end, "chunking changed the outcome");
}

/// Feeds `data` to a handshake, then the leftover bytes to a frame decoder. Never panics.
pub fn handshake(data: &[u8]) {
    let mut hs = Handshake::new(Default::default());
    let _ = hs.poll_transmit();
    let Ok(used) = hs.handle_bytes(data) else {
        return;
    };
    if let Some(negotiated) = hs.poll_outcome() {
        let mut dec = Decoder::new(
            negotiated.max_frame.min(FUZZ_MAX_FRAME),
            negotiated.max_message.min(FUZZ_MAX_FRAME),
        );
        if dec.handle_bytes(&data[used..], Vec::new()).is_ok() {
            while let Ok(Some(f)) = dec.poll_frame() {
                parse_body(&f.header, f.body);
            }
        }
    }
}

/// A representative message for [`archive`]: every shape of field a real message has
/// (strings, vectors, options, enums, nested structs) and every kind of handle.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct FuzzMessage {
    /// A fixed-size field.
    pub id: u64,
    /// A relative pointer to bytes that must be UTF-8.
    pub name: String,
    /// A vector of structs that hold relative pointers themselves.
    pub items: Vec<FuzzItem>,
    /// An option around a string.
    pub note: Option<String>,
    /// An enum with a tag byte to check.
    pub state: FuzzState,
    /// A channel end, archived as a handle index.
    pub reply: Sender<u64>,
    /// A file descriptor, archived as a handle index.
    pub fd: Fd,
    /// Optional byte streams.
    pub streams: Vec<Option<ByteStream>>,
}

/// An element of [`FuzzMessage::items`].
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct FuzzItem {
    /// A boolean (only 0 and 1 are valid).
    pub flag: bool,
    /// A char (surrogates and values past U+10FFFF are invalid).
    pub letter: char,
    /// Raw bytes.
    pub data: Vec<u8>,
}

/// The enum of [`FuzzMessage::state`].
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum FuzzState {
    /// No payload.
    Idle,
    /// A scalar payload.
    Busy(u32),
    /// A string payload.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Validates `data` as the archive of a [`FuzzMessage`], through the same code path
/// `Receiver::recv` uses, and when it is valid reads every field in place and tries to
/// deserialize it (with no handles attached, so that fails cleanly at the first handle).
/// Never panics.
pub fn archive(data: &[u8]) {
    // Fuzzer input is unaligned; a session copies every payload into an aligned buffer too.
    let mut bytes = Bytes::with_capacity(data.len());
    bytes.extend_from_slice(data);
    let Ok(valid) = Validated::<FuzzMessage>::new(message::Body::Owned(bytes)) else {
        return;
    };
    let m = valid.archived();
    let mut sum = m.id.to_native();
    sum = sum.wrapping_add(m.name.len() as u64);
    for item in m.items.iter() {
        sum = sum.wrapping_add(u64::from(item.flag));
        sum = sum.wrapping_add(u64::from(item.letter.to_native()));
        sum = sum.wrapping_add(item.data.iter().map(|b| u64::from(*b)).sum::<u64>());
    }
    if let Some(note) = m.note.as_ref() {
        sum = sum.wrapping_add(note.as_str().chars().count() as u64);
    }
    sum = sum.wrapping_add(match &m.state {
        ArchivedFuzzState::Idle => 0,
        ArchivedFuzzState::Busy(n) => u64::from(n.to_native()),
        ArchivedFuzzState::Failed { reason } => reason.as_str().len() as u64,
    });
    sum = sum.wrapping_add(u64::from(m.reply.index()) + u64::from(m.fd.index()));
    for s in m.streams.iter() {
        sum = sum.wrapping_add(s.as_ref().map_or(0, |h| u64::from(h.index())));
    }
    std::hint::black_box(sum);
    // Deserializing needs the handle table; without one it must fail, not panic.
    let decoded = message::decode::<FuzzMessage>(m, &mut Vec::new());
    std::hint::black_box(decoded.is_ok());
}

/// Decodes `stream` in reads of `chunk` bytes; reports each frame as (header bytes, body).
fn decode_chunked(
    stream: &[u8],
    chunk: usize,
    on_frame: &mut dyn FnMut((Vec<u8>, Vec<u8>)),
) -> Result<(), crate::proto::DecodeError> {
    let mut dec = Decoder::new(FUZZ_MAX_FRAME, FUZZ_MAX_FRAME - 4096);
    for piece in stream.chunks(chunk) {
        dec.handle_bytes(piece, Vec::new())?;
        while let Some(f) = dec.poll_frame()? {
            parse_body(&f.header, f.body);
            on_frame((f.header.encode().to_vec(), f.body.to_vec()));
        }
    }
    Ok(())
}

fn parse_body(header: &frame::Header, body: &[u8]) {
    match header.kind {
        Kind::Open => {
            let _ = frame::parse_open(body);
        }
        Kind::Data => {
            if let Ok((descs, _payload)) = frame::parse_data(header, body) {
                descs.for_each(drop);
            }
        }
        Kind::Reset => {
            let _ = frame::parse_reset(header, body);
        }
        Kind::GoAway => {
            let _ = frame::parse_goaway(header, body);
        }
        Kind::Ping | Kind::Pong => {
            let _ = frame::parse_ping(body);
        }
        Kind::Ring => {
            let _ = frame::parse_ring(body);
        }
        Kind::Blob => {
            let _ = frame::parse_blob(body);
        }
        Kind::Offer => {
            let _ = frame::parse_offer(body);
        }
        Kind::Intro => {
            let _ = frame::parse_intro(body);
        }
        Kind::Join => {
            let _ = frame::parse_join(body);
        }
        Kind::Close | Kind::Credit | Kind::Forget => {}
    }
}

/// Valid archives of [`FuzzMessage`], one populated and one minimal: the seeds in
/// `fuzz/seeds/archive/`, so that the fuzzer starts from inputs that pass validation.
///
/// # Panics
///
/// When the system cannot create a socket pair.
pub fn archive_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let (reply, _rx) = crate::pipe::<u64>();
    let (a, b) = ByteStream::pair().expect("a socket pair for the seed");
    let (r2, _rx2) = crate::pipe::<u64>();
    let (c, _d) = ByteStream::pair().expect("a socket pair for the seed");
    let full = FuzzMessage {
        id: 0x0123_4567_89ab_cdef,
        name: "worker-1 héllo".into(),
        items: vec![
            FuzzItem {
                flag: true,
                letter: 'λ',
                data: vec![1, 2, 3, 4, 5, 6, 7, 8, 9],
            },
            FuzzItem {
                flag: false,
                letter: 'a',
                data: Vec::new(),
            },
        ],
        note: Some("a note".into()),
        state: FuzzState::Failed {
            reason: "no space left".into(),
        },
        reply,
        fd: Fd::new(std::os::fd::OwnedFd::from(a.into_unix_stream())),
        streams: vec![Some(b), None],
    };
    let minimal = FuzzMessage {
        id: 0,
        name: String::new(),
        items: Vec::new(),
        note: None,
        state: FuzzState::Busy(7),
        reply: r2,
        fd: Fd::new(std::os::fd::OwnedFd::from(c.into_unix_stream())),
        streams: Vec::new(),
    };
    let encode = |m: &FuzzMessage| {
        message::encode(m, 1 << 20, 0)
            .expect("the seed messages are small and encodable")
            .bytes
            .to_vec()
    };
    vec![("full", encode(&full)), ("minimal", encode(&minimal))]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in seeds are what `archive_seeds` produces, and they validate (so the
    /// archive target really reaches the read-in-place code). Set `LIBCHAN_WRITE_SEEDS=1` to
    /// rewrite them after changing `FuzzMessage`.
    #[test]
    fn archive_seeds_are_current_and_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/archive");
        for (name, bytes) in archive_seeds() {
            let mut aligned = Bytes::new();
            aligned.extend_from_slice(&bytes);
            assert!(
                Validated::<FuzzMessage>::new(message::Body::Owned(aligned)).is_ok(),
                "{name}"
            );
            archive(&bytes);
            let path = dir.join(name);
            if std::env::var_os("LIBCHAN_WRITE_SEEDS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let stored = std::fs::read(&path).unwrap_or_default();
            assert!(
                stored == bytes,
                "{} is stale: rerun with LIBCHAN_WRITE_SEEDS=1",
                path.display()
            );
        }
    }

    #[test]
    fn archive_rejects_garbage_and_truncation_without_panicking() {
        for (_, bytes) in archive_seeds() {
            for cut in 0..bytes.len() {
                archive(&bytes[..cut]);
                archive(&bytes[cut..]);
            }
            let mut flipped = bytes.clone();
            for i in 0..flipped.len() {
                flipped[i] ^= 0xff;
                archive(&flipped);
                flipped[i] ^= 0xff;
            }
        }
    }
}
