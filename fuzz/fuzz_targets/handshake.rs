//! Handshake then frames: arbitrary peer bytes must never panic.
//! Run with `cargo +nightly fuzz run handshake`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    libchan::fuzzing::handshake(data);
});
