#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ocpp_lago_bridge_fuzz::checks::lago_response(data));
