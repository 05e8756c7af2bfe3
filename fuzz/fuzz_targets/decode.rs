//! Fuzz target: every decoder behind the parser. Arbitrary bytes that parse
//! as a message go through each link's typed decoders and through the
//! sealed-envelope opener (with keys the fuzzer cannot know, and with a
//! sealer's own output mutated by the input). Nothing may panic, and an
//! envelope that opens must be one the sealer made.
#![no_main]

use ims::proto::crs::{ClientRequest, CrsRequest, EventBatch, Welcome};
use ims::proto::ms::{read_event, Challenge, MsRequest};
use ims::proto::peer::{Init, InitAck, PeerRequest};
use ims::seal::{Role, SessionKeys};
use ims::wire::{parse, Limits, Message, Status};
use libfuzzer_sys::fuzz_target;

fn decoders(m: &Message) {
    let _ = ClientRequest::from_message(m);
    let _ = CrsRequest::from_message(m);
    let _ = MsRequest::from_message(m);
    let _ = Challenge::from_message(m);
    let _ = read_event(m);
    let _ = Init::from_message(m);
    let _ = InitAck::from_message(m);
    let _ = PeerRequest::from_message(m.clone());
    let _ = serde_json::from_slice::<Welcome>(&m.body);
    let _ = serde_json::from_slice::<EventBatch>(&m.body);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Status::Complete { message, .. }) = parse(data, &Limits::DEFAULT.for_files()) {
        decoders(&message);
        // A stranger's envelope never opens.
        let mut keys = SessionKeys::derive(b"fuzz secret", b"fuzz context", Role::Responder);
        assert!(keys.recv.open(&message).is_err());
    }
    // A real envelope with the input spliced into its bytes: it opens only
    // if unchanged.
    let mut sender = SessionKeys::derive(b"k", b"c", Role::Initiator);
    let mut receiver = SessionKeys::derive(b"k", b"c", Role::Responder);
    let inner = Message::request("MSG").with_header("Id", 1).with_body(b"hello".to_vec());
    let Ok(sealed) = sender.send.seal("PEER", &[("From", "a"), ("To", "b")], &inner) else {
        return;
    };
    let mut bytes = sealed.encode();
    if let Some((&at, rest)) = data.split_first() {
        let pos = at as usize % bytes.len();
        for (i, b) in rest.iter().enumerate().take(8) {
            let j = (pos + i) % bytes.len();
            bytes[j] ^= b;
        }
    }
    if let Ok(Status::Complete { message, .. }) = parse(&bytes, &Limits::DEFAULT.for_files()) {
        decoders(&message);
        if let Ok(opened) = receiver.recv.open(&message) {
            assert_eq!(opened, inner, "a changed envelope opened to something else");
        }
    }
});
