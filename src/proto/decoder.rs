//! The frame decoder: a byte stream plus fd batches in, validated frames with their fds out.
//!
//! # Binding fds to frames
//!
//! On a unix stream socket, fds passed with `SCM_RIGHTS` arrive with the `recvmsg` whose byte
//! range holds the first byte of the `sendmsg` that carried them; the kernel never merges two
//! fd-carrying writes into one read, but may prepend earlier fd-less bytes. The writer sends
//! every fd-carrying frame with one `sendmsg` starting at the frame's first byte. So the
//! decoder takes input as *reads*: each read's fds (its batch) are recorded with the absolute
//! stream range `[start, end)` of the read's bytes, and a frame declaring `nfds = k > 0` must
//! find, at the head of the batch queue, a batch whose range contains the frame's first byte
//! and that holds exactly `k` fds ([`DecodeError::MisboundFds`] otherwise). A batch whose
//! range ends at or before the start of the next frame to decode, without having been claimed,
//! is [`DecodeError::UnclaimedFds`]. A read delivering more than [`MAX_FDS`] fds is
//! [`DecodeError::TooManyFds`].
//!
//! # Invariants
//!
//! - `buf[start..end]` holds the undecoded bytes; `offset` is the stream offset of
//!   `buf[start]`. Batches are ordered by range and never overlap.
//! - A header is validated (kind, body length, the negotiated `max_frame` and `max_message`)
//!   as soon as its 16 bytes are buffered, so a huge `len` is rejected before its body is.
//! - The buffer grows to at most what one frame needs (`max_frame + 16`) plus what the caller
//!   asks for in [`Decoder::read_buf`].
//! - After an error the decoder is poisoned: every later call returns the same error, and all
//!   fds it held are dropped (closed).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use super::frame::{Header, Kind, HANDLE_LEN, HEADER_LEN, MAX_FDS};
use super::DecodeError;

/// Initial size of the read buffer.
const INITIAL_BUF: usize = 64 * 1024;

/// A drained read buffer up to this size is always kept.
const KEEP_BUF: usize = 1024 * 1024;

/// Frames over which the largest recent frame is remembered (see `Decoder::read_buf`).
const PEAK_WINDOW: u32 = 64;

/// One complete frame: its header, its body, and the fds bound to it.
#[derive(Debug)]
pub(crate) struct Frame<'a> {
    /// The validated header.
    pub(crate) header: Header,
    /// The body, `header.len` bytes, borrowed from the decoder's buffer.
    pub(crate) body: &'a [u8],
    /// Exactly `header.nfds` descriptors, in the order they arrived.
    pub(crate) fds: Vec<OwnedFd>,
}

/// Decodes frames from a byte stream with attached fd batches.
///
/// ```text
/// let mut dec = Decoder::new(negotiated.max_frame, negotiated.max_message);
/// let n = socket.recv_with_fds(dec.read_buf(4096), &mut fds)?; // in the transport
/// dec.handle_read(n, fds)?;
/// while let Some(frame) = dec.poll_frame()? {
///     session.handle_frame(frame);
/// }
/// ```
#[derive(Debug)]
pub(crate) struct Decoder {
    max_frame: u32,
    max_message: u32,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]`.
    offset: u64,
    /// Fd batches not yet bound, in stream order.
    batches: VecDeque<FdBatch>,
    /// The header of the frame at `start`, once validated, with the fds bound to it.
    pending: Option<(Header, Vec<OwnedFd>)>,
    /// Whether the `FDS` feature was negotiated.
    fds_allowed: bool,
    error: Option<DecodeError>,
    /// Largest frame among the previous `PEAK_WINDOW` frames, and among the current ones.
    peak: usize,
    recent_peak: usize,
    recent_frames: u32,
}

#[derive(Debug)]
struct FdBatch {
    start: u64,
    end: u64,
    fds: Vec<OwnedFd>,
}

impl Decoder {
    /// A decoder for a stream whose frames obey the negotiated `max_frame` and `max_message`.
    ///
    /// Offset 0 of its stream is the first byte after the peer's hello.
    pub(crate) fn new(max_frame: u32, max_message: u32) -> Self {
        Self {
            max_frame,
            max_message,
            buf: Vec::new(),
            start: 0,
            end: 0,
            offset: 0,
            batches: VecDeque::new(),
            pending: None,
            fds_allowed: true,
            error: None,
            peak: 0,
            recent_peak: 0,
            recent_frames: 0,
        }
    }

    /// Sets whether fds may arrive at all: `false` unless the `FDS` feature was negotiated
    /// (the default is `true`). With `false`, any fd is [`DecodeError::FdsNotNegotiated`].
    ///
    /// ```text
    /// let dec = Decoder::new(n.max_frame, n.max_message)
    ///     .with_fds_allowed(n.features.contains(Features::FDS));
    /// ```
    pub(crate) fn with_fds_allowed(mut self, allowed: bool) -> Self {
        self.fds_allowed = allowed;
        self
    }

    /// Spare space at the end of the buffer, at least `min` bytes, for the next read.
    ///
    /// After writing `n` bytes at its start, call [`Decoder::handle_read`]. Consumed bytes are
    /// compacted away first, so a caller that drains [`Decoder::poll_frame`] between reads
    /// keeps the buffer within one frame plus `min`.
    pub(crate) fn read_buf(&mut self, min: usize) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // Keep a buffer that recent frames needed (a stream of large messages must not
            // pay for a fresh zeroed buffer each time); give back one that only an old
            // outlier needed.
            let needed = 2 * self.peak.max(self.recent_peak);
            if self.buf.len() > KEEP_BUF.max(min).max(needed) {
                // Give back the memory a huge frame needed.
                self.buf = Vec::new();
            }
        }
        if self.buf.len() - self.end < min && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let need = self.end + min;
        if self.buf.len() < need {
            let frame_limit = self.max_frame as usize + HEADER_LEN;
            let grown = (self.buf.len() * 2)
                .max(INITIAL_BUF)
                .min(frame_limit)
                .max(need);
            self.buf.resize(grown, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records that the caller wrote `n` bytes at the start of [`Decoder::read_buf`], received
    /// together with `fds`.
    ///
    /// # Errors
    ///
    /// The poisoning error, [`DecodeError::FdsNotNegotiated`] for fds on a session without
    /// the `FDS` feature, [`DecodeError::TooManyFds`] for more than 253 fds, or
    /// [`DecodeError::UnclaimedFds`] for fds that came with zero bytes.
    ///
    /// # Panics
    ///
    /// If `n` exceeds the spare space [`Decoder::read_buf`] returned.
    pub(crate) fn handle_read(&mut self, n: usize, fds: Vec<OwnedFd>) -> Result<(), DecodeError> {
        self.check()?;
        assert!(n <= self.buf.len() - self.end, "read past read_buf");
        let start = self.stream_end();
        self.end += n;
        if fds.is_empty() {
            return Ok(());
        }
        if !self.fds_allowed {
            return Err(self.fail(DecodeError::FdsNotNegotiated {
                count: fds.len().min(usize::from(u16::MAX)) as u16,
            }));
        }
        if fds.len() > usize::from(MAX_FDS) {
            return Err(self.fail(DecodeError::TooManyFds { count: fds.len() }));
        }
        if n == 0 {
            // fds travel with at least one byte; an empty range can hold no frame start.
            return Err(self.fail(DecodeError::UnclaimedFds {
                count: fds.len() as u16,
            }));
        }
        self.batches.push_back(FdBatch {
            start,
            end: start + n as u64,
            fds,
        });
        Ok(())
    }

    /// Copies `data` into the buffer and records it as one read together with `fds`.
    ///
    /// # Errors
    ///
    /// As [`Decoder::handle_read`].
    #[cfg_attr(not(any(test, feature = "fuzzing")), allow(dead_code))]
    pub(crate) fn handle_bytes(
        &mut self,
        data: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), DecodeError> {
        self.check()?;
        self.read_buf(data.len())[..data.len()].copy_from_slice(data);
        self.handle_read(data.len(), fds)
    }

    /// The next complete frame, or `None` until more bytes arrive.
    ///
    /// # Errors
    ///
    /// Any [`DecodeError`]: a header or fd-binding violation. The decoder is then poisoned.
    pub(crate) fn poll_frame(&mut self) -> Result<Option<Frame<'_>>, DecodeError> {
        self.check()?;
        if self.pending.is_none() {
            if let Err(err) = self.drop_unclaimed() {
                return Err(self.fail(err));
            }
            let Some(bytes) = self.buf[self.start..self.end].first_chunk::<HEADER_LEN>() else {
                return Ok(None);
            };
            let header = match Header::parse(bytes).and_then(|h| self.check_limits(h)) {
                Ok(header) => header,
                Err(err) => return Err(self.fail(err)),
            };
            let fds = match self.bind_fds(header.nfds) {
                Ok(fds) => fds,
                Err(err) => return Err(self.fail(err)),
            };
            self.pending = Some((header, fds));
        }
        let Some((header, _)) = &self.pending else {
            return Ok(None);
        };
        let frame_len = header.frame_len();
        if self.end - self.start < frame_len {
            return Ok(None);
        }
        // Invariant: checked `is_some` just above.
        let (header, fds) = self.pending.take().expect("pending header");
        let body_start = self.start + HEADER_LEN;
        self.start += frame_len;
        self.offset += frame_len as u64;
        self.recent_peak = self.recent_peak.max(frame_len);
        self.recent_frames += 1;
        if self.recent_frames == PEAK_WINDOW {
            self.peak = self.recent_peak;
            self.recent_peak = 0;
            self.recent_frames = 0;
        }
        Ok(Some(Frame {
            header,
            body: &self.buf[body_start..self.start],
            fds,
        }))
    }

    /// The error that poisoned this decoder, if any.
    #[cfg(test)]
    pub(crate) fn error(&self) -> Option<DecodeError> {
        self.error
    }

    /// Bytes buffered but not yet returned as frames (a partial frame at end of stream means
    /// the peer closed mid-frame).
    pub(crate) fn buffered(&self) -> usize {
        self.end - self.start
    }

    fn stream_end(&self) -> u64 {
        self.offset + (self.end - self.start) as u64
    }

    fn check(&self) -> Result<(), DecodeError> {
        match self.error {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    fn fail(&mut self, err: DecodeError) -> DecodeError {
        self.error = Some(err);
        // Dropping the batches and any bound fds closes them.
        self.batches.clear();
        self.pending = None;
        err
    }

    fn check_limits(&self, header: Header) -> Result<Header, DecodeError> {
        if header.len > self.max_frame {
            return Err(DecodeError::FrameTooLarge {
                len: header.len,
                max: self.max_frame,
            });
        }
        if header.kind == Kind::Data {
            // `Header::parse` guaranteed `len >= 16 * arg`.
            let payload = header.len - header.arg * HANDLE_LEN as u32;
            if payload > self.max_message {
                return Err(DecodeError::MessageTooLarge {
                    len: payload,
                    max: self.max_message,
                });
            }
        }
        Ok(header)
    }

    /// Errors if the head batch's read ended before the frame that starts at `offset`.
    fn drop_unclaimed(&mut self) -> Result<(), DecodeError> {
        match self.batches.front() {
            Some(batch) if batch.end <= self.offset => Err(DecodeError::UnclaimedFds {
                count: batch.fds.len() as u16,
            }),
            _ => Ok(()),
        }
    }

    /// Takes the batch for a frame starting at `offset` that declares `nfds` fds.
    fn bind_fds(&mut self, nfds: u16) -> Result<Vec<OwnedFd>, DecodeError> {
        if nfds == 0 {
            return Ok(Vec::new());
        }
        let Some(batch) = self.batches.front() else {
            return Err(DecodeError::MisboundFds { nfds, received: 0 });
        };
        if !(batch.start..batch.end).contains(&self.offset) {
            return Err(DecodeError::MisboundFds { nfds, received: 0 });
        }
        if batch.fds.len() != usize::from(nfds) {
            return Err(DecodeError::MisboundFds {
                nfds,
                received: batch.fds.len() as u16,
            });
        }
        // Invariant: `front()` was `Some` above.
        Ok(self.batches.pop_front().expect("head batch").fds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::{
        encode_close, encode_credit, encode_data, encode_goaway, encode_open, encode_ping,
        encode_pong, encode_reset, parse_data, GoAwayReason, HandleDesc, HandleKind, ResetReason,
    };

    const MAX_FRAME: u32 = 1 << 20;

    fn decoder() -> Decoder {
        Decoder::new(MAX_FRAME, MAX_FRAME - 4096)
    }

    fn fds(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
            .collect()
    }

    fn data_frame(chan: u32, nfds: u16, payload: &[u8]) -> Vec<u8> {
        let handles = vec![HandleDesc::fd(); nfds.into()];
        let mut out = Vec::new();
        encode_data(&mut out, chan, &handles, payload.len(), nfds);
        out.extend_from_slice(payload);
        out
    }

    /// One frame of every kind, fd-less.
    fn all_kinds() -> Vec<u8> {
        let mut out = Vec::new();
        encode_open(&mut out, 1, 77);
        out.extend_from_slice(&data_frame(1, 0, b"payload"));
        let handles = [HandleDesc {
            kind: HandleKind::Receiver,
            chan: 3,
            fingerprint: 5,
            offer: 0,
        }];
        encode_data(&mut out, 1, &handles, 3, 0);
        out.extend_from_slice(b"abc");
        encode_data(&mut out, 1, &[], 0, 0);
        encode_credit(&mut out, 2, 4096);
        encode_ping(&mut out, 9);
        encode_pong(&mut out, 9);
        encode_reset(&mut out, 2, ResetReason::ReceiverGone, "bye");
        encode_close(&mut out, 1);
        encode_goaway(&mut out, GoAwayReason::Normal, "done");
        out
    }

    /// Drains every frame as (header, body, fd count).
    fn drain(dec: &mut Decoder) -> Result<Vec<(Header, Vec<u8>, usize)>, DecodeError> {
        let mut out = Vec::new();
        while let Some(f) = dec.poll_frame()? {
            out.push((f.header, f.body.to_vec(), f.fds.len()));
        }
        Ok(out)
    }

    #[test]
    fn decodes_every_kind_in_one_read() {
        let mut dec = decoder();
        dec.handle_bytes(&all_kinds(), Vec::new()).unwrap();
        let frames = drain(&mut dec).unwrap();
        let kinds: Vec<Kind> = frames.iter().map(|f| f.0.kind).collect();
        use Kind::*;
        assert_eq!(
            kinds,
            [Open, Data, Data, Data, Credit, Ping, Pong, Reset, Close, GoAway]
        );
        assert_eq!(frames[1].1, b"payload");
        let (descs, payload) = parse_data(&frames[2].0, &frames[2].1).unwrap();
        assert_eq!((descs.len(), payload), (1, &b"abc"[..]));
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn every_split_point_yields_the_same_frames() {
        let stream = all_kinds();
        let mut whole = decoder();
        whole.handle_bytes(&stream, Vec::new()).unwrap();
        let expect = drain(&mut whole).unwrap();

        for split in 0..=stream.len() {
            let mut dec = decoder();
            let mut got = Vec::new();
            dec.handle_bytes(&stream[..split], Vec::new()).unwrap();
            got.extend(drain(&mut dec).unwrap());
            dec.handle_bytes(&stream[split..], Vec::new()).unwrap();
            got.extend(drain(&mut dec).unwrap());
            assert_eq!(got, expect, "split at {split}");
        }

        let mut dec = decoder();
        let mut got = Vec::new();
        for byte in &stream {
            dec.handle_bytes(std::slice::from_ref(byte), Vec::new())
                .unwrap();
            got.extend(drain(&mut dec).unwrap());
        }
        assert_eq!(got, expect, "byte by byte");
    }

    #[test]
    fn truncated_input_resumes() {
        let frame = data_frame(1, 0, &[7; 100]);
        let mut dec = decoder();
        dec.handle_bytes(&frame[..10], Vec::new()).unwrap();
        assert!(dec.poll_frame().unwrap().is_none());
        dec.handle_bytes(&frame[10..20], Vec::new()).unwrap();
        assert!(dec.poll_frame().unwrap().is_none());
        assert!(dec.poll_frame().unwrap().is_none());
        dec.handle_bytes(&frame[20..], Vec::new()).unwrap();
        let f = dec.poll_frame().unwrap().unwrap();
        assert_eq!(f.body, &frame[16..]);
        assert!(dec.poll_frame().unwrap().is_none());
    }

    #[test]
    fn huge_len_is_rejected_from_the_header_alone() {
        let mut header = Header::new(Kind::Data, 1, 0, MAX_FRAME + 1)
            .encode()
            .to_vec();
        let mut dec = decoder();
        dec.handle_bytes(&header[..15], Vec::new()).unwrap();
        assert!(dec.poll_frame().unwrap().is_none());
        dec.handle_bytes(&header[15..], Vec::new()).unwrap();
        let err = DecodeError::FrameTooLarge {
            len: MAX_FRAME + 1,
            max: MAX_FRAME,
        };
        assert_eq!(dec.poll_frame().unwrap_err(), err);
        assert!(dec.buf.len() <= INITIAL_BUF);

        header = Header::new(Kind::Data, 1, 0, MAX_FRAME).encode().to_vec();
        let mut dec = decoder();
        dec.handle_bytes(&header, Vec::new()).unwrap();
        assert_eq!(
            dec.poll_frame().unwrap_err(),
            DecodeError::MessageTooLarge {
                len: MAX_FRAME,
                max: MAX_FRAME - 4096
            }
        );
    }

    #[test]
    fn read_buf_is_kept_for_recent_large_frames_and_given_back_later() {
        let mut dec = Decoder::new(4 << 20, (4 << 20) - 4096);
        let big = data_frame(1, 0, &[3; 1_500_000]);
        for _ in 0..3 {
            dec.handle_bytes(&big, Vec::new()).unwrap();
            assert_eq!(drain(&mut dec).unwrap().len(), 1);
        }
        let grown = dec.buf.len();
        assert!(
            grown > KEEP_BUF,
            "a 1.5 MB frame needs more than {KEEP_BUF}: {grown}"
        );
        dec.read_buf(1);
        assert_eq!(dec.buf.len(), grown, "recent frames needed it: kept");
        let small = data_frame(1, 0, &[1; 100]);
        for _ in 0..2 * PEAK_WINDOW {
            dec.handle_bytes(&small, Vec::new()).unwrap();
            assert_eq!(drain(&mut dec).unwrap().len(), 1);
        }
        dec.read_buf(1);
        assert!(
            dec.buf.len() <= KEEP_BUF,
            "only old frames needed it: given back"
        );
    }

    #[test]
    fn read_buf_grows_and_compacts() {
        let mut dec = decoder();
        let frames: Vec<u8> = (0..4)
            .flat_map(|_| data_frame(1, 0, &[1; 40_000]))
            .collect();
        let mut fed = 0;
        let mut count = 0;
        while fed < frames.len() {
            let buf = dec.read_buf(1);
            let n = buf.len().min(frames.len() - fed).min(30_000);
            buf[..n].copy_from_slice(&frames[fed..fed + n]);
            dec.handle_read(n, Vec::new()).unwrap();
            fed += n;
            count += drain(&mut dec).unwrap().len();
            assert!(dec.buf.len() <= INITIAL_BUF.max(40_016 + 30_000));
        }
        assert_eq!(count, 4);
        assert!(dec.read_buf(100_000).len() >= 100_000);
    }

    #[test]
    fn fds_bind_to_the_frame_starting_in_their_read() {
        let mut dec = decoder();
        dec.handle_bytes(&data_frame(1, 2, b"x"), fds(2)).unwrap();
        let f = dec.poll_frame().unwrap().unwrap();
        assert_eq!((f.header.nfds, f.fds.len()), (2, 2));
        let (descs, payload) = parse_data(&f.header, f.body).unwrap();
        assert_eq!((descs.len(), payload), (2, &b"x"[..]));
    }

    #[test]
    fn fds_may_arrive_with_only_the_first_byte() {
        let frame = data_frame(1, 1, b"hello");
        let mut dec = decoder();
        dec.handle_bytes(&frame[..1], fds(1)).unwrap();
        assert!(dec.poll_frame().unwrap().is_none());
        dec.handle_bytes(&frame[1..], Vec::new()).unwrap();
        assert_eq!(dec.poll_frame().unwrap().unwrap().fds.len(), 1);
    }

    #[test]
    fn fds_glued_after_fdless_frames() {
        // Linux may deliver earlier fd-less bytes in the same read as an fd-carrying write.
        let mut stream = Vec::new();
        encode_ping(&mut stream, 1);
        stream.extend_from_slice(&data_frame(1, 0, b"plain"));
        let fd_frame_at = stream.len();
        stream.extend_from_slice(&data_frame(1, 3, b"with fds"));
        encode_close(&mut stream, 1);

        for split in 0..=stream.len() {
            // The fds ride with whichever read holds the fd frame's first byte.
            let (first, second) = stream.split_at(split);
            let (fds_a, fds_b) = if split > fd_frame_at {
                (fds(3), Vec::new())
            } else {
                (Vec::new(), fds(3))
            };
            let mut dec = decoder();
            let mut got = Vec::new();
            dec.handle_bytes(first, fds_a).unwrap();
            got.extend(drain(&mut dec).unwrap());
            dec.handle_bytes(second, fds_b).unwrap();
            got.extend(drain(&mut dec).unwrap());
            let nfds: Vec<usize> = got.iter().map(|f| f.2).collect();
            assert_eq!(nfds, [0, 0, 3, 0], "split at {split}");
        }
    }

    #[test]
    fn two_fd_frames_in_consecutive_reads() {
        let a = data_frame(1, 1, b"a");
        let b = data_frame(1, 2, b"b");
        let mut dec = decoder();
        dec.handle_bytes(&a, fds(1)).unwrap();
        dec.handle_bytes(&b, fds(2)).unwrap();
        let got = drain(&mut dec).unwrap();
        assert_eq!(got.iter().map(|f| f.2).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn misbound_fds() {
        // Fds arrive one read after the frame's first byte.
        let frame = data_frame(1, 1, b"late");
        let mut dec = decoder();
        dec.handle_bytes(&frame[..1], Vec::new()).unwrap();
        dec.handle_bytes(&frame[1..], fds(1)).unwrap();
        assert_eq!(
            dec.poll_frame().unwrap_err(),
            DecodeError::MisboundFds {
                nfds: 1,
                received: 0
            }
        );

        // Wrong count.
        let mut dec = decoder();
        dec.handle_bytes(&data_frame(1, 2, b""), fds(1)).unwrap();
        assert_eq!(
            dec.poll_frame().unwrap_err(),
            DecodeError::MisboundFds {
                nfds: 2,
                received: 1
            }
        );

        // No fds at all.
        let mut dec = decoder();
        dec.handle_bytes(&data_frame(1, 1, b""), Vec::new())
            .unwrap();
        assert_eq!(
            dec.poll_frame().unwrap_err(),
            DecodeError::MisboundFds {
                nfds: 1,
                received: 0
            }
        );
    }

    #[test]
    fn unclaimed_fds() {
        // Fds with a read that holds only fd-less frames.
        let mut dec = decoder();
        let mut stream = Vec::new();
        encode_ping(&mut stream, 1);
        dec.handle_bytes(&stream, fds(1)).unwrap();
        assert_eq!(dec.poll_frame().unwrap().unwrap().header.kind, Kind::Ping);
        assert_eq!(
            dec.poll_frame().unwrap_err(),
            DecodeError::UnclaimedFds { count: 1 }
        );

        // Fds with a read in the middle of a frame's body, found when the next frame starts.
        let frame = data_frame(1, 0, b"0123456789");
        let mut dec = decoder();
        dec.handle_bytes(&frame[..20], Vec::new()).unwrap();
        dec.handle_bytes(&frame[20..], fds(2)).unwrap();
        assert!(dec.poll_frame().unwrap().is_some());
        assert_eq!(
            dec.poll_frame().unwrap_err(),
            DecodeError::UnclaimedFds { count: 2 }
        );

        // Fds with an empty read.
        let mut dec = decoder();
        assert_eq!(
            dec.handle_bytes(&[], fds(1)),
            Err(DecodeError::UnclaimedFds { count: 1 })
        );
    }

    #[test]
    fn fds_without_the_fds_feature() {
        let mut dec = decoder().with_fds_allowed(false);
        dec.handle_bytes(&data_frame(1, 0, b"plain"), Vec::new())
            .unwrap();
        assert!(dec.poll_frame().unwrap().is_some());
        let err = DecodeError::FdsNotNegotiated { count: 1 };
        assert_eq!(dec.handle_bytes(&data_frame(1, 1, b""), fds(1)), Err(err));
        assert_eq!(dec.poll_frame().unwrap_err(), err);
    }

    #[test]
    fn too_many_fds_in_one_read() {
        let mut dec = decoder();
        assert_eq!(
            dec.handle_bytes(&data_frame(1, 0, b""), fds(254)),
            Err(DecodeError::TooManyFds { count: 254 })
        );
        let mut dec = decoder();
        dec.handle_bytes(&data_frame(1, 253, b""), fds(253))
            .unwrap();
        assert_eq!(dec.poll_frame().unwrap().unwrap().fds.len(), 253);
    }

    #[test]
    fn errors_poison_the_decoder_and_close_its_fds() {
        let mut stream = data_frame(1, 1, b"ok");
        stream.extend_from_slice(&Header::new(Kind::Close, 1, 0, 3).encode());
        stream.extend_from_slice(&data_frame(1, 1, b"never"));

        let (probe_r, probe_w) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut dec = decoder();
        let mut batch = fds(1);
        batch[0] = OwnedFd::from(probe_w);
        dec.handle_bytes(&stream[..stream.len() - 30], fds(1))
            .unwrap();
        dec.handle_bytes(&stream[stream.len() - 30..], batch)
            .unwrap();
        assert!(dec.poll_frame().unwrap().is_some());
        let err = DecodeError::BadBodyLength {
            kind: Kind::Close,
            len: 3,
        };
        assert_eq!(dec.poll_frame().unwrap_err(), err);
        assert_eq!(dec.error(), Some(err));
        assert_eq!(dec.poll_frame().unwrap_err(), err);
        assert_eq!(dec.handle_bytes(b"more", fds(1)), Err(err));
        assert_eq!(dec.handle_read(0, Vec::new()), Err(err));
        // The queued write end was closed: the read end sees EOF.
        use std::io::Read;
        let mut probe_r = probe_r;
        assert_eq!(probe_r.read(&mut [0; 1]).unwrap(), 0);
    }
}
