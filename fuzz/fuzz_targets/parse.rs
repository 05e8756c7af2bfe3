//! Fuzz target: `wire::parse` on arbitrary bytes under the default, tight
//! and unbounded limits. It must never panic; `parse_head` must agree with
//! it; and a message it accepts must encode to bytes that parse back to the
//! same message (with `encoded_len` exact).
#![no_main]

use ims::wire::{parse, parse_head, Error, Limits, Status};
use libfuzzer_sys::fuzz_target;

const TIGHT: Limits = Limits {
    max_line: 32,
    max_headers: 4,
    max_header_bytes: 96,
    max_body: 16,
    max_file_body: 24,
};

/// Only the format itself refuses anything under these.
const ROOMY: Limits = Limits {
    max_line: usize::MAX,
    max_headers: usize::MAX,
    max_header_bytes: usize::MAX,
    max_body: usize::MAX,
    max_file_body: usize::MAX,
};

fuzz_target!(|data: &[u8]| {
    for limits in [Limits::DEFAULT, TIGHT, ROOMY, Limits::DEFAULT.for_files()] {
        let parsed = parse(data, &limits);
        let head = parse_head(data, &limits);
        match (parsed, head) {
            (Err(e), Err(h)) => assert_eq!(e, h),
            (Err(Error::MissingBodyTerminator), Ok(Some(_))) => {}
            (Ok(Status::Incomplete), Ok(_)) => {}
            (Ok(Status::Complete { message, used }), Ok(Some(head))) => {
                assert!(used <= data.len());
                assert_eq!(used, head.len + message.body.len() + 2);
                let encoded = message.encode();
                assert_eq!(encoded.len(), message.encoded_len());
                match parse(&encoded, &ROOMY) {
                    Ok(Status::Complete {
                        message: again,
                        used,
                    }) => {
                        assert_eq!(again, message);
                        assert_eq!(used, encoded.len());
                    }
                    other => panic!("re-encoded message did not parse: {other:?}"),
                }
            }
            (p, h) => panic!("parse {p:?} but parse_head {h:?}"),
        }
    }
});
