//! libFuzzer entry point; the target itself is [`peft_fuzz::targets::coco`] (shared with the corpus replay test).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| peft_fuzz::targets::coco(data));
