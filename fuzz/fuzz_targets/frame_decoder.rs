//! Frame decoder: arbitrary bytes in arbitrary read sizes must never panic, and chunking must
//! not change the frames decoded. Run with `cargo +nightly fuzz run frame_decoder`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    libchan::fuzzing::decode_frames_differential(data);
});
