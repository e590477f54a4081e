//! The scrape's deflate encoder: any text, cut into texts every n bytes (n
//! the first byte; 0, cut in the middle), must inflate (flate2) to itself.
//! The second half of its texts is a piece of its own, joined after the
//! first half's as a scrape joins them, and after another text's too, as a
//! reused piece is: so a piece that reached back into the one before it
//! would inflate wrong.
#![no_main]

use std::io::Read as _;

use libfuzzer_sys::fuzz_target;
use podmeter::deflate;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let texts: Vec<&[u8]> = match n {
        0 => {
            let (a, b) = rest.split_at(rest.len() / 2);
            vec![a, b]
        }
        n => rest.chunks(n as usize).collect(),
    };
    let (first, second) = texts.split_at(texts.len() / 2);
    let mut tail = Vec::new();
    deflate::piece(second, &mut tail);
    // Another first half: every byte differs from this one's.
    let other: Vec<u8> = first.concat().iter().map(|b| b.wrapping_add(1)).collect();
    for before in [first, &[&other[..]]] {
        let mut z = Vec::new();
        deflate::piece(before, &mut z);
        z.extend_from_slice(&tail);
        z.extend_from_slice(&[0x03, 0x00]);
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(&z[..])
            .read_to_end(&mut out)
            .expect("podmeter's deflate made a stream flate2 cannot inflate");
        assert_eq!(
            out,
            [before.concat(), second.concat()].concat(),
            "inflated to other bytes"
        );
    }
});
