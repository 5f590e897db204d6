//! Just enough of the wire protocol (docs/PROTOCOL.md) to play a peer by hand: a hello, frame
//! headers, and a reader for what the session answers.

use std::io::Read;

/// Frame kinds (PROTOCOL.md section 4.2).
pub const OPEN: u8 = 1;
/// A message.
pub const DATA: u8 = 2;
/// The session is closing.
pub const GOAWAY: u8 = 8;

/// Our hello with the reference defaults and no `FDS` feature (we attach no fds).
pub fn hello() -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..4].copy_from_slice(b"LCHN");
    h[4..6].copy_from_slice(&1u16.to_le_bytes());
    h[8..16].copy_from_slice(&0u64.to_le_bytes());
    h[16..20].copy_from_slice(&16_842_752u32.to_le_bytes());
    h[20..24].copy_from_slice(&(16u32 << 20).to_le_bytes());
    h[24..28].copy_from_slice(&(256u32 << 10).to_le_bytes());
    h[28..32].copy_from_slice(&65_536u32.to_le_bytes());
    h
}

/// A frame header.
pub fn header(len: u32, kind: u8, chan: u32, arg: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(16);
    f.extend_from_slice(&len.to_le_bytes());
    f.push(kind);
    f.push(0);
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&chan.to_le_bytes());
    f.extend_from_slice(&arg.to_le_bytes());
    f
}

/// OPEN of channel `chan` for the type with fingerprint `fp`.
pub fn open(chan: u32, fp: u64) -> Vec<u8> {
    let mut f = header(8, OPEN, chan, 0);
    f.extend_from_slice(&fp.to_le_bytes());
    f
}

/// DATA on `chan` carrying `payload` and no handles.
pub fn data(chan: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = header(payload.len() as u32, DATA, chan, 0);
    f.extend_from_slice(payload);
    f
}

/// Reads frames from the session until a GOAWAY arrives; returns its reason code and text.
/// `None` when the stream ended or failed first (the caller sets a read timeout).
pub fn read_goaway(raw: &mut impl Read) -> Option<(u32, String)> {
    loop {
        let mut h = [0u8; 16];
        raw.read_exact(&mut h).ok()?;
        let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as usize;
        let arg = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
        let mut body = vec![0u8; len];
        raw.read_exact(&mut body).ok()?;
        if h[4] == GOAWAY {
            return Some((arg, String::from_utf8_lossy(&body).into_owned()));
        }
    }
}
