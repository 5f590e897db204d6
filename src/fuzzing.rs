//! Entry points for the fuzz targets in `fuzz/` (enabled by the `fuzzing` feature).
//!
//! Each function takes arbitrary bytes and drives one protocol decoder with them. None of
//! them may panic on any input, except where noted: a panic is a bug the fuzzer reports.

use crate::proto::decoder::Decoder;
use crate::proto::frame::{self, Kind};
use crate::proto::handshake::Handshake;

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
        Kind::Close | Kind::Credit => {}
    }
}
