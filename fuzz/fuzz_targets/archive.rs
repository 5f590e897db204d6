//! Archive validation: arbitrary bytes validated as a message with strings, vectors, options,
//! enums and handle fields, through the code path `Receiver::recv` uses, must never panic.
//! Run with `cargo +nightly fuzz run archive fuzz/corpus/archive fuzz/seeds/archive`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    libchan::fuzzing::archive(data);
});
