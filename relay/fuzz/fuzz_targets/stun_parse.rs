//! Fuzz target: the STUN parser and every attribute decoder on arbitrary
//! bytes, plus ChannelData framing. Nothing may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_relay::stun::{Message, channel_data, decode_error_code, framed_len};

fuzz_target!(|data: &[u8]| {
    let _ = channel_data::parse(data);
    let _ = channel_data::framed_len(data);
    let _ = framed_len(data);
    if let Ok(m) = Message::parse(data) {
        let types: Vec<u16> = m.attribute_types().collect();
        for t in types {
            let _ = m.get_xor_addr(t);
            let _ = m.get_u32(t);
            let _ = m.get_str(t);
            let _ = m.get(t).map(decode_error_code);
        }
        let _ = m.verify_integrity(b"fuzz");
    }
});
