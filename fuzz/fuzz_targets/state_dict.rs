//! `io::state_dict::parse_state_dict` on arbitrary bytes, then the round trip of what it
//! accepts (serialize and parse again).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(sd) = qfuse::io::state_dict::parse_state_dict(data, "fuzz") {
        let bytes = sd.to_bytes().expect("an accepted state dict serializes");
        let back = qfuse::io::state_dict::parse_state_dict(&bytes, "fuzz round trip")
            .expect("a serialized state dict parses");
        assert_eq!(back.names(), sd.names());
    }
});
