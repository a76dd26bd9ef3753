//! `config::ConfigList::from_json` on arbitrary text, then applying what it accepts to the
//! Mnist network (PTQ), which resolves every name and setting.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = qfuse::config::ConfigList::from_json(text) {
        let mut model = qfuse::model::mnist::mnist(0).expect("the Mnist network builds");
        let _ = qfuse::config::apply(&mut model, &cfg, qfuse::config::QuantMode::Ptq);
    }
});
