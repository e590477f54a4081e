//! A deflate (RFC 1951) encoder for exposition text.
//!
//! The text is lines that mostly repeat the line before them: the same
//! metric name and label names, the same label values but for a few (a
//! container's ids), and a new sample value. A general LZ77 matcher
//! (miniz, zlib) probes a hash table at every byte for an earlier match,
//! and in this text most bytes are random hex ids that match nothing
//! nearby: at a thousand pods deflate was about half of a gzipped scrape's
//! CPU, most of it in that search, for nothing.
//!
//! So each line is cut into spans, a span ending after each double quote
//! or space (label values are quoted; HELP text is words). A span is a
//! back-reference where it goes on from where the copy before it came from
//! (so that a row copied from the family before runs on over its whole
//! label set), or equals the span in the same place of the line before, or
//! else one of the spans the piece wrote before, looked up once (a small
//! node's ids come back in every family, within reach). Any other span is
//! literals. There is no search at every byte; what is left is coding the
//! literals.
//!
//! The Huffman codes are each piece's own: the lines are first cut into
//! literals and back-references, whose symbols are counted, and the codes
//! built from the counts are sent as the piece's dynamic block header
//! (about 170 bytes). Every symbol gets a code, used or not, so the codes
//! are always complete.
//!
//! Written by hand, so fenced off here; the tests decode it with flate2's
//! inflater, the gzip tests with gzip(1) as well, and the `deflate` fuzz
//! target any texts, cut anywhere. It builds without the `agent` feature
//! for that target.

use std::cmp::Reverse;

/// The longest code deflate allows.
const MAX_BITS: u32 = 15;
const MIN_MATCH: usize = 3;
const MAX_MATCH: usize = 258;
/// The farthest a back-reference may reach.
const WINDOW: usize = 32 * 1024;
/// Literals 0–255, end of block 256, lengths 257–285.
const LITLEN: usize = 286;
const DISTANCES: usize = 30;
const END_OF_BLOCK: usize = 256;

/// The first length of each length symbol (257 on), and its extra bits.
const LENGTH_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LENGTH_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
/// The first distance of each distance symbol, and its extra bits.
const DISTANCE_BASE: [u16; DISTANCES] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DISTANCE_EXTRA: [u8; DISTANCES] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];

/// The order in which a dynamic header gives the code length code's lengths.
const CODE_LENGTH_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// A code as written: its bits in the order deflate reads them (the first
/// bit lowest), and how many.
#[derive(Clone, Copy, Debug, Default)]
struct Code {
    bits: u32,
    len: u32,
}

/// A piece's codes, and each length's code with its extra bits.
struct Codes {
    literal: [Code; 256],
    end: Code,
    /// Indexed by match length (3–258).
    length: [Code; MAX_MATCH + 1],
    distance: [Code; DISTANCES],
    litlen_lengths: Vec<u8>,
    distance_lengths: Vec<u8>,
}

/// How often each symbol occurs in a piece.
struct Counts {
    litlen: [u64; LITLEN],
    distance: [u64; DISTANCES],
}

impl Codes {
    fn new(counts: &Counts) -> Self {
        // Unused symbols get codes too, as long as the heaviest may be
        // (the limiter shortens them at little cost to the rest): a
        // complete code whatever was counted.
        let weights = |c: &[u64]| -> Vec<u64> { c.iter().map(|&n| n * 64 + 1).collect() };
        let litlen_lengths = lengths(&weights(&counts.litlen), MAX_BITS);
        let distance_lengths = lengths(&weights(&counts.distance), MAX_BITS);
        let litlen = canonical(&litlen_lengths);
        let distance = canonical(&distance_lengths);
        let mut length = [Code::default(); MAX_MATCH + 1];
        for (n, slot) in length.iter_mut().enumerate().skip(MIN_MATCH) {
            let i = length_symbol(n);
            let code = litlen[257 + i];
            let extra = (n - LENGTH_BASE[i] as usize) as u32;
            *slot = Code {
                bits: code.bits | extra << code.len,
                len: code.len + LENGTH_EXTRA[i] as u32,
            };
        }
        Self {
            literal: std::array::from_fn(|b| litlen[b]),
            end: litlen[END_OF_BLOCK],
            length,
            distance: std::array::from_fn(|i| distance[i]),
            litlen_lengths,
            distance_lengths,
        }
    }

    /// The dynamic block's header after BFINAL and BTYPE: HLIT, HDIST,
    /// HCLEN, the code length code, and every code's length. The code
    /// length code gives the sixteen lengths 0–15 four bits each (a
    /// complete code) and has no run-length symbols: 316 lengths at four
    /// bits, 158 bytes, little beside a piece.
    fn header(&self, w: &mut Bits<'_>) {
        w.put(Code {
            bits: (LITLEN - 257) as u32,
            len: 5,
        });
        w.put(Code {
            bits: (DISTANCES - 1) as u32,
            len: 5,
        });
        w.put(Code {
            bits: 19 - 4,
            len: 4,
        });
        for &s in &CODE_LENGTH_ORDER {
            w.put(Code {
                bits: if s < 16 { 4 } else { 0 },
                len: 3,
            });
        }
        for &l in self.litlen_lengths.iter().chain(&self.distance_lengths) {
            // Length l's code is l itself, four bits.
            w.put(Code {
                bits: reverse(u32::from(l), 4),
                len: 4,
            });
        }
    }
}

fn length_symbol(n: usize) -> usize {
    LENGTH_BASE.partition_point(|&b| b as usize <= n) - 1
}

fn distance_symbol(d: usize) -> usize {
    DISTANCE_BASE.partition_point(|&b| b as usize <= d) - 1
}

/// Code lengths of a Huffman code for `weights`, none longer than `max`:
/// an optimal code, whose too-long codes (if any) are then shortened and
/// the Kraft sum restored by lengthening the shortest codes that can be
/// (as miniz does), the shortest codes going to the heaviest symbols.
/// Every symbol gets a code, and the code is complete.
fn lengths(weights: &[u64], max: u32) -> Vec<u8> {
    let n = weights.len();
    assert!(n >= 2 && n <= 1 << max, "{n} symbols for {max}-bit codes");
    // Two queues: the leaves by weight, and the inner nodes, which are made
    // in order of weight. Node k < n is symbol k; inner nodes follow.
    let mut leaves: Vec<usize> = (0..n).collect();
    leaves.sort_unstable_by_key(|&i| (weights[i], i));
    let mut weight = weights.to_vec();
    weight.resize(2 * n - 1, 0);
    let mut parent = vec![0usize; 2 * n - 1];
    let (mut leaf, mut inner, mut next) = (0, n, n);
    let lightest = |leaf: &mut usize, inner: &mut usize, next: usize, weight: &[u64]| {
        if *leaf < n && (*inner == next || weight[leaves[*leaf]] <= weight[*inner]) {
            *leaf += 1;
            leaves[*leaf - 1]
        } else {
            *inner += 1;
            *inner - 1
        }
    };
    while next < 2 * n - 1 {
        let a = lightest(&mut leaf, &mut inner, next, &weight);
        let b = lightest(&mut leaf, &mut inner, next, &weight);
        weight[next] = weight[a] + weight[b];
        parent[a] = next;
        parent[b] = next;
        next += 1;
    }
    // A parent is made after its children, so the depths fill from the
    // root (the last node) down.
    let mut depth = vec![0u32; next];
    for k in (0..next - 1).rev() {
        depth[k] = depth[parent[k]] + 1;
    }
    let max = max as usize;
    let mut count = vec![0u64; n.max(max) + 1];
    for &d in &depth[..n] {
        count[(d as usize).min(max)] += 1;
    }
    let mut kraft: u64 = (1..=max).map(|d| count[d] << (max - d)).sum();
    while kraft > 1 << max {
        count[max] -= 1;
        let d = (1..max)
            .rev()
            .find(|&d| count[d] > 0)
            .expect("a shorter code");
        count[d] -= 1;
        count[d + 1] += 2;
        kraft -= 1;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (Reverse(weights[i]), i));
    let mut out = vec![0u8; n];
    let mut by_length = (1..=max).flat_map(|d| std::iter::repeat_n(d as u8, count[d] as usize));
    for i in order {
        out[i] = by_length.next().expect("a length for every symbol");
    }
    out
}

/// The canonical codes (RFC 1951, 3.2.2) of `lengths`, bit-reversed for
/// writing.
fn canonical(lengths: &[u8]) -> Vec<Code> {
    let mut count = [0u32; MAX_BITS as usize + 1];
    for &l in lengths {
        count[l as usize] += 1;
    }
    count[0] = 0;
    let mut next = [0u32; MAX_BITS as usize + 1];
    let mut code = 0;
    for bits in 1..=MAX_BITS as usize {
        code = (code + count[bits - 1]) << 1;
        next[bits] = code;
    }
    lengths
        .iter()
        .map(|&l| {
            let l = l as usize;
            let c = next[l];
            next[l] += 1;
            Code {
                bits: reverse(c, l as u32),
                len: l as u32,
            }
        })
        .collect()
}

fn reverse(code: u32, len: u32) -> u32 {
    if len == 0 {
        0
    } else {
        code.reverse_bits() >> (32 - len)
    }
}

/// Bits, the first lowest, into bytes.
struct Bits<'a> {
    out: &'a mut Vec<u8>,
    buf: u64,
    n: u32,
}

impl Bits<'_> {
    #[inline]
    fn put(&mut self, c: Code) {
        debug_assert!(c.len <= 32 && (c.len == 32 || c.bits >> c.len == 0));
        self.buf |= u64::from(c.bits) << self.n;
        self.n += c.len;
        if self.n >= 32 {
            self.out.extend_from_slice(&(self.buf as u32).to_le_bytes());
            self.buf >>= 32;
            self.n -= 32;
        }
    }

    /// Pads to a byte with zero bits.
    fn align(&mut self) {
        let bytes = self.n.div_ceil(8) as usize;
        self.out.extend_from_slice(&self.buf.to_le_bytes()[..bytes]);
        self.buf = 0;
        self.n = 0;
    }
}

/// Where a line starts in the piece's text, and where its spans end.
struct Line<'t> {
    text: &'t [u8],
    at: usize,
    ends: Vec<usize>,
}

impl Line<'_> {
    /// Begins the line at `at`; [`Line::end`] ends its spans.
    fn start(&mut self, at: usize) {
        self.at = at;
        self.ends.clear();
    }

    /// Ends a span `end` bytes into the line.
    fn end(&mut self, end: usize) {
        if self.ends.last() != Some(&end) {
            self.ends.push(end);
        }
    }

    fn span(&self, j: usize) -> (usize, usize) {
        let start = if j == 0 { 0 } else { self.ends[j - 1] };
        (start, self.ends[j])
    }
}

/// What a piece is cut into.
enum Token<'t> {
    Literals(&'t [u8]),
    Copy { len: u16, distance: u16 },
}

/// Appends `texts`, concatenated, to `out` as one deflate block (not the
/// last), then an empty stored block (a sync flush) to end on a byte: so
/// that another such piece, or a final block, can follow.
pub fn piece(texts: &[&[u8]], out: &mut Vec<u8>) {
    // One text to cut: several are joined (small families share a piece,
    // so this copies little), and a copy can then look anywhere back.
    let joined;
    let text: &[u8] = match texts {
        [one] => one,
        _ => {
            joined = texts.concat();
            &joined
        }
    };
    // Room for eight tokens a line of some 250 bytes.
    let mut tokens = Vec::with_capacity(text.len() / 32);
    let mut seen = Seen::new();
    let mut prev = Line {
        text: &[],
        at: 0,
        ends: Vec::new(),
    };
    let mut cur = Line {
        text: &[],
        at: 0,
        ends: Vec::new(),
    };
    // A span ends after each double quote or space, and a line after each
    // newline, or at the text's end.
    let mut line = 0;
    cur.start(0);
    for i in memchr::memchr3_iter(b'"', b' ', b'\n', text) {
        cur.end(i + 1 - line);
        if text[i] == b'\n' {
            cur.text = &text[line..=i];
            cut(text, &cur, &prev, &mut seen, &mut tokens);
            std::mem::swap(&mut prev, &mut cur);
            line = i + 1;
            cur.start(line);
        }
    }
    if line < text.len() {
        cur.end(text.len() - line);
        cur.text = &text[line..];
        cut(text, &cur, &prev, &mut seen, &mut tokens);
    }

    let mut counts = Counts {
        litlen: [0; LITLEN],
        distance: [0; DISTANCES],
    };
    // Literals into four tables in turn: one table would make every count
    // wait for the one before it.
    let mut literal = [[0u32; 256]; 4];
    let mut k = 0usize;
    for t in &tokens {
        match *t {
            Token::Literals(bytes) => {
                for &b in bytes {
                    literal[k & 3][b as usize] += 1;
                    k += 1;
                }
            }
            Token::Copy { len, distance } => {
                counts.litlen[257 + length_symbol(len as usize)] += 1;
                counts.distance[distance_symbol(distance as usize)] += 1;
            }
        }
    }
    for (b, n) in counts.litlen[..256].iter_mut().enumerate() {
        *n = literal.iter().map(|t| u64::from(t[b])).sum();
    }
    counts.litlen[END_OF_BLOCK] = 1;
    let c = Codes::new(&counts);

    let mut w = Bits { out, buf: 0, n: 0 };
    // BFINAL 0, BTYPE 10 (dynamic codes).
    w.put(Code {
        bits: 0b100,
        len: 3,
    });
    c.header(&mut w);
    for t in &tokens {
        match *t {
            Token::Literals(bytes) => literals(&c, &mut w, bytes),
            Token::Copy { len, distance } => {
                w.put(c.length[len as usize]);
                w.put(distance_code(&c, distance as usize));
            }
        }
    }
    w.put(c.end);
    // The sync flush: BFINAL 0, BTYPE 00, then to the byte, LEN 0, NLEN.
    w.put(Code { bits: 0, len: 3 });
    w.align();
    w.out.extend_from_slice(&[0, 0, 0xff, 0xff]);
}

/// Cuts one line of `text`: each span that goes on from where the pending
/// copy's source does, or else equals the one in the same place of the line
/// before, or else one [`Seen`] earlier in the piece, is copied from there
/// (runs of them as one back-reference where the distance is the same), and
/// every other span is literals.
fn cut<'t>(
    text: &[u8],
    cur: &Line<'t>,
    prev: &Line<'_>,
    seen: &mut Seen<'t>,
    tokens: &mut Vec<Token<'t>>,
) {
    // A pending back-reference: where its output starts in `cur`, and its
    // distance; it runs to the end of the last span that matched.
    let mut run: Option<(usize, usize)> = None;
    let mut run_end = 0;
    for j in 0..cur.ends.len() {
        let (start, end) = cur.span(j);
        let span = &cur.text[start..end];
        let at = cur.at + start;
        // First, the bytes after the pending copy's source: a copy from the
        // same row of the family before runs on over its whole label set.
        let on = run
            .filter(|_| run_end == start)
            .map(|(_, d)| d)
            .filter(|&d| text[at - d..at - d + span.len()] == *span);
        let above = || {
            (j < prev.ends.len())
                .then(|| {
                    let (ps, pe) = prev.span(j);
                    let distance = at - (prev.at + ps);
                    (distance <= WINDOW && *span == prev.text[ps..pe]).then_some(distance)
                })
                .flatten()
        };
        match on.or_else(above).or_else(|| seen.find(span, at)) {
            Some(distance) => {
                match run {
                    Some((_, d)) if d == distance && run_end == start => {}
                    _ => {
                        copies(cur, run, run_end, tokens);
                        run = Some((start, distance));
                    }
                }
                run_end = end;
            }
            None => {
                copies(cur, run.take(), run_end, tokens);
                tokens.push(Token::Literals(span));
            }
        }
    }
    copies(cur, run, run_end, tokens);
}

/// Spans of three bytes or more that the piece wrote and that neither went
/// on from a copy's source nor equalled the span in the same place of the
/// line before, by a hash of their first bytes and length, the last one in
/// each slot. On a small node
/// the same ids come back in each family within the window, as they do not
/// on a large one, where a span costs one probe that finds nothing.
struct Seen<'t> {
    slots: Vec<Option<(usize, &'t [u8])>>,
}

impl<'t> Seen<'t> {
    const BITS: u32 = 10;

    fn new() -> Self {
        Self {
            slots: vec![None; 1 << Self::BITS],
        }
    }

    /// The distance back to an earlier `span` within the window, if its slot
    /// holds one; `span`, at `at` in the piece, takes the slot.
    #[inline]
    fn find(&mut self, span: &'t [u8], at: usize) -> Option<usize> {
        if span.len() < MIN_MATCH {
            return None;
        }
        let mut head = [0u8; 8];
        let n = span.len().min(8);
        head[..n].copy_from_slice(&span[..n]);
        let h = (u64::from_le_bytes(head) ^ (span.len() as u64) << 56)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let slot = &mut self.slots[(h >> (64 - Self::BITS)) as usize];
        let found = match *slot {
            Some((was, s)) if at - was <= WINDOW && s == span => Some(at - was),
            _ => None,
        };
        *slot = Some((at, span));
        found
    }
}

/// A pending back-reference as copies of at most 258 bytes, and as literals
/// where fewer than three bytes are left.
fn copies<'t>(
    cur: &Line<'t>,
    run: Option<(usize, usize)>,
    end: usize,
    tokens: &mut Vec<Token<'t>>,
) {
    let Some((mut start, distance)) = run else {
        return;
    };
    while end - start >= MIN_MATCH {
        let left = end - start;
        let mut n = left.min(MAX_MATCH);
        // Leave nothing a copy cannot take.
        if (1..MIN_MATCH).contains(&(left - n)) {
            n = left - MIN_MATCH;
        }
        tokens.push(Token::Copy {
            len: n as u16,
            distance: distance as u16,
        });
        start += n;
    }
    if start < end {
        tokens.push(Token::Literals(&cur.text[start..end]));
    }
}

#[inline]
fn distance_code(c: &Codes, d: usize) -> Code {
    let i = distance_symbol(d);
    let code = c.distance[i];
    Code {
        bits: code.bits | ((d - DISTANCE_BASE[i] as usize) as u32) << code.len,
        len: code.len + DISTANCE_EXTRA[i] as u32,
    }
}

#[inline]
fn literals(c: &Codes, w: &mut Bits<'_>, bytes: &[u8]) {
    // Two literals at a time: two codes are at most 30 bits.
    let mut pairs = bytes.chunks_exact(2);
    for p in &mut pairs {
        let (a, b) = (c.literal[p[0] as usize], c.literal[p[1] as usize]);
        w.put(Code {
            bits: a.bits | b.bits << a.len,
            len: a.len + b.len,
        });
    }
    if let [last] = pairs.remainder() {
        w.put(c.literal[*last as usize]);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn inflate(z: &[u8]) -> Vec<u8> {
        // The pieces and an empty final block with fixed codes.
        let mut stream = z.to_vec();
        stream.extend_from_slice(&[0x03, 0x00]);
        let mut d = flate2::read::DeflateDecoder::new(&stream[..]);
        let mut out = Vec::new();
        d.read_to_end(&mut out).expect("a valid deflate stream");
        out
    }

    fn roundtrip(texts: &[&[u8]]) -> usize {
        let mut z = Vec::new();
        piece(texts, &mut z);
        assert_eq!(inflate(&z), texts.concat(), "{texts:?}");
        z.len()
    }

    /// A random-looking id (splitmix64), as hex.
    fn hex(seed: u64, chars: usize) -> String {
        let mut x = seed;
        let mut s = String::new();
        while s.len() < chars {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            s.push_str(&format!("{:016x}", z ^ (z >> 31)));
        }
        s.truncate(chars);
        s
    }

    /// A family as podmeter writes it, with random pod and container ids.
    fn family(name: &str, rows: u64, seed: u64) -> String {
        let mut t = format!("# HELP {name} Some help.\n# TYPE {name} counter\n");
        for r in 0..rows {
            t.push_str(&format!(
                "{name}{{node=\"vm\",namespace=\"ns-{}\",pod=\"\",container=\"\",pod_uid=\"{}\",container_id=\"{}\",runtime=\"\",qos=\"Burstable\"}} {}\n",
                r % 3,
                hex(r, 36),
                hex(r + 1_000_000, 64),
                (r * 7919 + seed) as f64 / 1e6
            ));
        }
        t
    }

    #[test]
    fn codes_are_complete_clean_and_fit_fifteen_bits() {
        let mut counts = Counts {
            litlen: [0; LITLEN],
            distance: [0; DISTANCES],
        };
        // Hex digits by the million, then counts falling as Fibonacci's
        // rise, whose optimal code is far deeper than 15 bits.
        for b in b"0123456789abcdef" {
            counts.litlen[*b as usize] = 1_000_000;
        }
        let (mut a, mut b) = (1u64, 1u64);
        for s in (b'g'..=b'z').chain(b'A'..=b'Z') {
            counts.litlen[s as usize] = a;
            (a, b) = (b, a + b);
        }
        counts.distance[3] = 1;
        let c = Codes::new(&counts);
        for lengths in [&c.litlen_lengths, &c.distance_lengths] {
            assert!(
                lengths.iter().all(|&l| (1..=15).contains(&l)),
                "{lengths:?}"
            );
            let kraft: u64 = lengths.iter().map(|&l| 1u64 << (15 - l)).sum();
            assert_eq!(kraft, 1 << 15, "not a complete code: {lengths:?}");
        }
        // The heavier, the shorter (or as long).
        let l = &c.litlen_lengths;
        let by = |b: u8| l[b as usize];
        assert!(
            by(b'Z') <= by(b'7') && by(b'7') <= by(b'g') && by(b'g') <= by(0x80),
            "{l:?}"
        );
        assert!(by(b'Z') < by(0x80), "{l:?}");
        // `Bits::put` takes no bits above a code's length (only checked in
        // debug builds there).
        let all = c
            .literal
            .iter()
            .chain(&c.length[MIN_MATCH..])
            .chain(&c.distance);
        for code in all.chain([&c.end]) {
            assert!(code.len <= 28 && code.bits >> code.len == 0, "{code:?}");
        }
        for d in [1, 4, 5, 24577, WINDOW] {
            let code = distance_code(&c, d);
            assert!(
                code.len <= 28 && code.bits >> code.len == 0,
                "{d}: {code:?}"
            );
        }
    }

    #[test]
    fn lengths_are_limited_and_complete_however_skewed() {
        // Fibonacci weights make an optimal code 39 deep.
        let mut fib = vec![1u64, 1];
        while fib.len() < 40 {
            fib.push(fib[fib.len() - 1] + fib[fib.len() - 2]);
        }
        let cases = [
            (fib.clone(), 15),
            (fib.clone(), 7),
            // As many symbols as codes of the longest length: all of them
            // end at it.
            (fib[..32].to_vec(), 5),
            (fib[..8].to_vec(), 3),
            (vec![5, 5], 15),
            (vec![1; 32768], 15),
        ];
        for (weights, max) in cases {
            let l = lengths(&weights, max);
            assert!(l.iter().all(|&l| l >= 1 && u32::from(l) <= max));
            let kraft: u64 = l.iter().map(|&l| 1u64 << (max - u32::from(l))).sum();
            assert_eq!(kraft, 1 << max, "{l:?}");
            // Heavier symbols never get longer codes.
            let mut by_weight: Vec<_> = weights.iter().zip(&l).collect();
            by_weight.sort();
            assert!(
                by_weight
                    .windows(2)
                    .all(|p| p[0].0 == p[1].0 || p[0].1 >= p[1].1)
            );
        }
    }

    #[test]
    fn any_text_decodes_to_itself() {
        let long_line = format!("x{{a=\"{}\"}} 1\n", "q\"".repeat(20_000));
        let binary: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"\n".to_vec(),
            b"\"".to_vec(),
            b"no newline at the end".to_vec(),
            b"a\"b\"\na\"b\"\na\"b\"\n".to_vec(),
            // Spans of one byte that match, which together make a copy.
            b"\"\"\"\n\"\"\"\n".to_vec(),
            // A match of two bytes between others: too short to copy.
            b"a\"b\"x\nc\"b\"y\n".to_vec(),
            // Equal lines longer than one copy can take.
            ("m{a=\"b\"} 1\n".repeat(3) + &"y".repeat(300) + "\n" + &"y".repeat(300) + "\n").into(),
            // Equal lines longer than the window: literals.
            long_line.repeat(3).into_bytes(),
            binary,
            family("podmeter_f", 50, 0).into_bytes(),
        ];
        for t in &cases {
            roundtrip(&[t]);
        }
        // Texts that split lines between them.
        roundtrip(&[
            b"m{a=\"",
            b"b\"} 1\nm{a=",
            b"\"b\"} 2\n",
            b"",
            b"m{a=\"b\"} 3",
        ]);
        // Lines as far back as a copy may reach are copied; one byte
        // farther, written as literals.
        let far = |len: usize| {
            let line = format!("\"{}\"\n", "z".repeat(len - 3));
            roundtrip(&[line.repeat(3).as_bytes()])
        };
        let (at, beyond) = (far(WINDOW), far(WINDOW + 1));
        assert!(at * 2 < beyond, "{at} bytes at the window, {beyond} beyond");
        // Every remainder a run of copies can leave.
        for n in 250..=520 {
            let line = format!("\"{}\"\n", "z".repeat(n));
            roundtrip(&[line.repeat(3).as_bytes()]);
        }
    }

    #[test]
    fn exposition_shrinks_as_much_as_with_a_general_deflater() {
        // A large node: families far longer than the window, where ours
        // must be as small. A small one: each row's ids come back in every
        // family within the window, and are copied from there; miniz also
        // matches parts of words and values, which ours does not, so ours
        // may be larger by half (before copies went on from their source,
        // it was 2.4 times as large).
        for (families, rows, percent) in [(4, 1000, 110), (16, 10, 150)] {
            let text: String = (0..families)
                .map(|f| family(&format!("podmeter_f{f}"), rows, f))
                .collect();
            let ours = roundtrip(&[text.as_bytes()]);
            let mut z = flate2::Compress::new(flate2::Compression::fast(), false);
            let mut general = Vec::with_capacity(text.len());
            z.compress_vec(text.as_bytes(), &mut general, flate2::FlushCompress::Sync)
                .unwrap();
            let (len, general) = (text.len(), general.len());
            println!("{families} x {rows}: {len} bytes: ours {ours}, miniz level 1 {general}");
            assert!(ours * 3 < len, "{ours} of {len}");
            assert!(
                ours * 100 <= general * percent,
                "ours {ours}, miniz {general}"
            );
        }
    }
}
