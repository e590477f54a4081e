//! The scrape's deflate encoder: any texts, cut anywhere, inflate (flate2)
//! to themselves.
#![no_main]

use std::io::Read as _;

use libfuzzer_sys::fuzz_target;
use podmeter::deflate;

fuzz_target!(|data: &[u8]| {
    // The first byte says where the rest is cut into texts: every n bytes,
    // or not at all (0). Lines then also run from one text into the next.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let texts: Vec<&[u8]> = match n {
        0 => vec![rest],
        n => rest.chunks(n as usize).collect(),
    };
    let mut z = Vec::new();
    deflate::piece(&texts, &mut z);
    // Twice, as a scrape joins pieces, then a final empty block.
    deflate::piece(&texts, &mut z);
    z.extend_from_slice(&[0x03, 0x00]);
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(&z[..])
        .read_to_end(&mut out)
        .expect("podmeter's deflate made a stream flate2 cannot inflate");
    assert_eq!(out, [rest, rest].concat(), "inflated to other bytes");
});
