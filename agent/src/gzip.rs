//! gzip for `/metrics`: the families that did not change since the last
//! scrape are not compressed again, and the rest are compressed on several
//! cores at once.
//!
//! At a thousand pods the exposition is about 4 MB. A general deflater at
//! its fastest level (miniz) took ~15 ms of one core for it: more than the
//! scrape's reading and rendering together. So the deflating is podmeter's
//! own ([`deflate`]), made for exposition text: each line is compared only
//! with the one before it. And many families repeat themselves from one
//! scrape to the next (limits, OOM kills, throttling of containers that
//! are never throttled, the pressure of idle ones), and the rest split
//! into independent pieces.
//!
//! So the body is made of pieces, each a family (or a run of small ones)
//! deflated on its own, joined into one gzip member (RFC 1952) as pigz
//! does: every piece ends with a sync flush (an empty stored block, which
//! leaves the stream byte-aligned and not final), so the raw deflate
//! streams follow one another, and no piece refers back into another. An
//! empty final block ends the stream. A piece whose families have the
//! fingerprints (128-bit xxh3, [`Family`]) of one of the last scrape's
//! pieces, or of one deflated ahead after a refresh ([`Gzip::warm`]), is
//! that piece's bytes again: the text itself is not hashed.
//!
//! The framing is written by hand, so it is fenced off here, and checked by
//! decoding with two independent inflaters (flate2's `GzDecoder`, which
//! checks the CRC and the length, and gzip(1)).

use std::{collections::HashMap, io, sync::Mutex, time::Instant};

use xxhash_rust::xxh3::Xxh3;

use crate::{
    deflate,
    metrics::{Family, take},
};

/// A family smaller than this shares its piece with its neighbours: every
/// piece carries its own Huffman codes (about 170 bytes of header) and a
/// sync flush, and matches nothing in the pieces before it.
const MIN_PIECE: usize = 16 * 1024;

/// Below this many bytes to deflate, one thread does it all: a thread's
/// start costs more than it would save.
const SPLIT_FROM: usize = 256 * 1024;

/// At most this many threads, however many cores: the scrape is not the
/// node's main work.
const MAX_THREADS: usize = 4;

/// A final, empty block with fixed codes: BFINAL 1, BTYPE 01, then the
/// end-of-block code (seven zero bits), padded to the byte.
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];

/// The gzip header: ID1 ID2, CM = deflate, no flags, no mtime, XFL 0 (no
/// claim about the level), OS unknown (255).
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

/// One piece, deflated and sync-flushed, with the CRC of its text.
struct Piece {
    deflated: Vec<u8>,
    crc: crc32fast::Hasher,
}

/// What one [`Gzip::compress`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Made {
    /// Pieces in the body.
    pub pieces: usize,
    /// Of them, taken from the last scrape or deflated ahead.
    pub reused: usize,
    /// Of those, deflated ahead ([`Gzip::warm`]).
    pub ahead: usize,
    /// Threads that deflated, the caller's included.
    pub threads: usize,
}

/// The compressor, with the pieces of the last scrape.
pub struct Gzip {
    /// Taken out by a scrape and put back with that scrape's pieces: a
    /// scrape that finds it taken (another one at the same moment)
    /// deflates everything, and its pieces are not kept.
    last: Mutex<Option<HashMap<u128, Piece>>>,
    /// Pieces deflated since the last scrape, after a refresh: replaced
    /// whole by each [`Gzip::warm`] and emptied by each scrape, so it
    /// holds at most one refresh's pieces.
    ahead: Mutex<HashMap<u128, Piece>>,
    threads: usize,
    /// When a scrape last asked for gzip: families are deflated between
    /// scrapes ([`Gzip::warm`]) only for an agent scraped with gzip.
    asked: Mutex<Option<Instant>>,
}

impl Default for Gzip {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_threads(cores)
    }
}

impl Gzip {
    /// A compressor that uses up to `threads` threads (capped at
    /// [`MAX_THREADS`]).
    pub fn with_threads(threads: usize) -> Self {
        Self {
            last: Mutex::new(Some(HashMap::new())),
            ahead: Mutex::new(HashMap::new()),
            threads: threads.clamp(1, MAX_THREADS),
            asked: Mutex::new(None),
        }
    }

    /// The gzip member of the concatenation of `families`. Fails only if a
    /// gzip thread panicked.
    pub fn compress(&self, families: &[Family]) -> io::Result<Vec<u8>> {
        self.compress_made(families).map(|(z, _)| z)
    }

    /// [`Gzip::compress`], and what it did.
    pub fn compress_made(&self, families: &[Family]) -> io::Result<(Vec<u8>, Made)> {
        *self.asked.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let groups = group(families);
        let hashes: Vec<u128> = groups
            .iter()
            .map(|g| match g {
                [one] => one.fingerprint,
                many => {
                    let mut h = Xxh3::new();
                    many.iter().for_each(|f| h.update(&f.fingerprint.to_le_bytes()));
                    h.digest128()
                }
            })
            .collect();

        let mut last = take(&self.last);
        // Until this scrape's pieces replace them, an empty cache goes
        // back if it fails (a panic, here or in a gzip thread): otherwise the
        // slot would stay taken, and no later scrape would reuse anything.
        let mut refill = last.is_some().then(|| Refill(&self.last));
        let mut pieces: Vec<Option<Piece>> = hashes
            .iter()
            .map(|h| last.as_mut().and_then(|l| l.remove(h)))
            .collect();
        drop(last);
        let mut ahead = std::mem::take(&mut *self.ahead.lock().unwrap_or_else(|e| e.into_inner()));
        let mut from_ahead = 0;
        for (p, h) in pieces.iter_mut().zip(&hashes).filter(|(p, _)| p.is_none()) {
            *p = ahead.remove(h);
            from_ahead += usize::from(p.is_some());
        }
        drop(ahead);
        let reused = pieces.iter().filter(|p| p.is_some()).count();

        let todo: Vec<usize> = (0..groups.len()).filter(|&i| pieces[i].is_none()).collect();
        let (made, threads) = self.deflate_all(&groups, &todo)?;
        for (i, p) in todo.into_iter().zip(made) {
            pieces[i] = Some(p);
        }
        let pieces: Vec<Piece> = pieces.into_iter().flatten().collect();

        let body: usize = pieces.iter().map(|p| p.deflated.len()).sum();
        let mut out = Vec::with_capacity(HEADER.len() + body + FINAL_BLOCK.len() + 8);
        out.extend_from_slice(&HEADER);
        let mut crc = crc32fast::Hasher::new();
        for p in &pieces {
            out.extend_from_slice(&p.deflated);
            crc.combine(&p.crc);
        }
        out.extend_from_slice(&FINAL_BLOCK);
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        // ISIZE is the length modulo 2^32.
        let len: usize = families.iter().map(|f| f.text.len()).sum();
        out.extend_from_slice(&(len as u32).to_le_bytes());

        let made = Made {
            pieces: pieces.len(),
            reused,
            ahead: from_ahead,
            threads,
        };
        if let Some(r) = refill.take() {
            std::mem::forget(r);
            let next = hashes.into_iter().zip(pieces).collect();
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(next);
        }
        Ok((out, made))
    }

    /// Deflates the groups `todo` names, on up to `self.threads` threads,
    /// the biggest first, each to the least loaded thread. Returns the
    /// pieces in `todo`'s order and the threads used.
    fn deflate_all(&self, groups: &[&[Family]], todo: &[usize]) -> io::Result<(Vec<Piece>, usize)> {
        let size = |i: usize| groups[i].iter().map(|f| f.text.len()).sum::<usize>();
        let total: usize = todo.iter().map(|&i| size(i)).sum();
        let n = if total < SPLIT_FROM {
            1
        } else {
            self.threads.min(todo.len()).max(1)
        };
        // Which thread deflates which group (positions in `todo`).
        let mut lanes: Vec<(usize, Vec<usize>)> = vec![(0, Vec::new()); n];
        let mut order: Vec<usize> = (0..todo.len()).collect();
        order.sort_by_key(|&k| std::cmp::Reverse(size(todo[k])));
        for k in order {
            let lane = lanes.iter_mut().min_by_key(|l| l.0).expect("n >= 1");
            lane.0 += size(todo[k]);
            lane.1.push(k);
        }
        let run = |lane: &[usize]| -> io::Result<Vec<(usize, Piece)>> {
            Ok(lane.iter().map(|&k| (k, compress(groups[todo[k]]))).collect())
        };
        let done: Vec<io::Result<Vec<(usize, Piece)>>> = std::thread::scope(|s| {
            let (mine, others) = lanes.split_first().expect("n >= 1");
            let handles: Vec<_> = others
                .iter()
                .map(|(_, lane)| {
                    // Where no thread can be made (a pids limit), deflate here.
                    std::thread::Builder::new()
                        .name("gzip".into())
                        .spawn_scoped(s, || run(lane))
                        .map_err(|_| lane)
                })
                .collect();
            let mut done = vec![run(&mine.1)];
            done.extend(handles.into_iter().map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("a gzip thread panicked"))),
                Err(lane) => run(lane),
            }));
            done
        });
        let mut pieces: Vec<Option<Piece>> = (0..todo.len()).map(|_| None).collect();
        for lane in done {
            for (k, p) in lane? {
                pieces[k] = Some(p);
            }
        }
        Ok((pieces.into_iter().flatten().collect(), n))
    }
}

impl Gzip {
    /// When a scrape last asked for gzip, if one did.
    pub fn last_asked(&self) -> Option<Instant> {
        *self.asked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deflates ahead, on the calling thread, those of `families` that a
    /// scrape sends as a piece of their own (the big ones: a small one's
    /// piece depends on its neighbours) and the last scrape's pieces lack,
    /// for the next scrape to take (see [`crate::prerender`]). They
    /// replace what an earlier call deflated (what it deflated for the
    /// same text is kept, not deflated again). Returns the positions in
    /// `families` of those deflated now.
    pub fn warm(&self, families: &[Family]) -> Vec<usize> {
        let todo: Vec<usize> = {
            let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            (0..families.len())
                .filter(|&i| alone(&families[i]))
                .filter(|&i| last.as_ref().is_none_or(|l| !l.contains_key(&families[i].fingerprint)))
                .collect()
        };
        let mut earlier = std::mem::take(&mut *self.ahead.lock().unwrap_or_else(|e| e.into_inner()));
        // Deflated with no lock held: a scrape meanwhile finds nothing
        // ahead and deflates those families itself (only time is lost).
        let mut next = HashMap::with_capacity(todo.len());
        let mut deflated = Vec::new();
        for i in todo {
            let f = &families[i];
            let piece = earlier.remove(&f.fingerprint).unwrap_or_else(|| {
                deflated.push(i);
                compress(std::slice::from_ref(f))
            });
            next.insert(f.fingerprint, piece);
        }
        *self.ahead.lock().unwrap_or_else(|e| e.into_inner()) = next;
        deflated
    }
}

/// Whether `f` is a piece of its own in any scrape ([`group`]), whose key is
/// then its fingerprint.
fn alone(f: &Family) -> bool {
    f.text.len() >= MIN_PIECE
}

/// Puts an empty cache back into the slot when dropped.
struct Refill<'a>(&'a Mutex<Option<HashMap<u128, Piece>>>);

impl Drop for Refill<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(HashMap::new());
    }
}

/// The families cut into runs: a family of [`MIN_PIECE`] or more alone,
/// smaller neighbours together until they reach it.
fn group(families: &[Family]) -> Vec<&[Family]> {
    let mut groups = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, f) in families.iter().enumerate() {
        if alone(f) && size > 0 {
            groups.push(&families[start..i]);
            (start, size) = (i, 0);
        }
        size += f.text.len();
        if size >= MIN_PIECE {
            groups.push(&families[start..=i]);
            (start, size) = (i + 1, 0);
        }
    }
    if start < families.len() {
        groups.push(&families[start..]);
    }
    groups
}

/// One piece: the texts as a raw deflate stream ([`deflate::piece`]),
/// sync-flushed so that the next piece's stream can follow it. No piece
/// refers to another.
fn compress(families: &[Family]) -> Piece {
    let mut crc = crc32fast::Hasher::new();
    let len: usize = families.iter().map(|f| f.text.len()).sum();
    let mut out = Vec::with_capacity(len / 3 + 256);
    for f in families {
        crc.update(&f.text);
    }
    let texts: Vec<&[u8]> = families.iter().map(|f| &f.text[..]).collect();
    deflate::piece(&texts, &mut out);
    Piece {
        deflated: out,
        crc,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn gunzip(z: &[u8]) -> Vec<u8> {
        let mut d = flate2::read::GzDecoder::new(z);
        let mut out = Vec::new();
        d.read_to_end(&mut out).expect("a valid gzip member");
        // One member: nothing may follow it.
        assert_eq!(d.into_inner(), &[] as &[u8], "bytes after the gzip member");
        out
    }

    /// Exposition-like families: repeated label blocks, values that vary
    /// with `seed`.
    fn families(sizes: &[usize], seed: usize) -> Vec<Family> {
        sizes
            .iter()
            .enumerate()
            .map(|(f, &rows)| {
                let mut t = format!("# TYPE podmeter_f{f} counter\n");
                for r in 0..rows {
                    t.push_str(&format!(
                        "podmeter_f{f}{{pod_uid=\"{:016x}\",qos=\"Burstable\"}} {}.{}\n",
                        r.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                        r * 7 + f + seed,
                        r % 997
                    ));
                }
                Family::new(t)
            })
            .collect()
    }

    fn concat(families: &[Family]) -> Vec<u8> {
        families.iter().flat_map(|f| f.text.iter().copied()).collect()
    }

    #[test]
    fn every_layout_decodes_to_the_text() {
        let layouts: [&[usize]; 6] = [
            &[],
            &[0],
            &[1, 2, 3],
            &[5000],
            &[3000, 1, 1, 4000, 2, 3000, 1],
            &[6000; 9],
        ];
        for sizes in layouts {
            let fams = families(sizes, 0);
            for threads in [1, 2, 3, 8] {
                let z = Gzip::with_threads(threads).compress(&fams).unwrap();
                assert_eq!(gunzip(&z), concat(&fams), "{sizes:?} on {threads}");
            }
        }
    }

    #[test]
    fn unchanged_families_are_not_compressed_again() {
        let gz = Gzip::with_threads(2);
        let sizes = [4000, 4000, 1, 2, 4000, 4000];
        let first = families(&sizes, 0);
        let (z1, m1) = gz.compress_made(&first).unwrap();
        assert_eq!((m1.pieces, m1.reused, m1.threads), (5, 0, 2));
        // The same text again: the same bytes, none compressed.
        let (z2, m2) = gz.compress_made(&first).unwrap();
        assert_eq!((m2.pieces, m2.reused), (5, 5));
        assert_eq!(z1, z2);
        // Two families change: two pieces are new, and the body is right.
        let mut next = first.clone();
        let changed = families(&sizes, 1);
        next[1] = changed[1].clone();
        next[4] = changed[4].clone();
        let (z3, m3) = gz.compress_made(&next).unwrap();
        assert_eq!((m3.pieces, m3.reused), (5, 3));
        assert_eq!(gunzip(&z3), concat(&next));
        // Only the last scrape's pieces are kept: the first's family 1
        // must be compressed again.
        let (z4, m4) = gz.compress_made(&first).unwrap();
        assert_eq!(m4.reused, 3);
        assert_eq!(gunzip(&z4), concat(&first));
    }

    #[test]
    fn a_scrape_beside_another_compresses_everything_and_keeps_nothing() {
        let gz = Gzip::with_threads(2);
        let fams = families(&[4000, 4000], 0);
        gz.compress(&fams).unwrap();
        // Another scrape holds the pieces.
        let held = take(&gz.last);
        let (z, m) = gz.compress_made(&fams).unwrap();
        assert_eq!(m.reused, 0);
        assert_eq!(gunzip(&z), concat(&fams));
        assert!(take(&gz.last).is_none(), "a scrape without the pieces put some back");
        *gz.last.lock().unwrap() = held;
        assert_eq!(gz.compress_made(&fams).unwrap().1.reused, 2);
    }

    #[test]
    fn families_deflated_ahead_are_taken_by_the_next_scrape() {
        let gz = Gzip::with_threads(2);
        assert!(gz.last_asked().is_none());
        let sizes = [4000, 4000, 1, 2, 4000];
        let first = families(&sizes, 0);
        gz.compress(&first).unwrap();
        assert!(gz.last_asked().is_some());
        // A refresh changed families 1 and 2, which are rendered ahead with
        // family 0, unchanged: only the big changed one is deflated (the
        // small one's piece depends on its neighbours; 0's is kept).
        let next = families(&sizes, 1);
        let refreshed = [first[0].clone(), next[1].clone(), next[2].clone()];
        assert_eq!(gz.warm(&refreshed), [1]);
        // The same again (a second refresh that changed nothing): kept, not
        // deflated again.
        assert_eq!(gz.warm(&refreshed), [] as [usize; 0]);
        let mut scraped = first.clone();
        scraped[1] = next[1].clone();
        scraped[2] = next[2].clone();
        let (z, m) = gz.compress_made(&scraped).unwrap();
        assert_eq!((m.pieces, m.reused, m.ahead), (4, 3, 1));
        assert_eq!(gunzip(&z), concat(&scraped));
        assert!(gz.ahead.lock().unwrap().is_empty(), "a scrape left pieces ahead");

        // What a refresh deflated is replaced by the next refresh's, not
        // kept beside it: at most one refresh's pieces wait.
        assert_eq!(gz.warm(&[next[4].clone()]), [0]);
        let later = families(&sizes, 2);
        assert_eq!(gz.warm(&[later[4].clone()]), [0]);
        let ahead: Vec<u128> = gz.ahead.lock().unwrap().keys().copied().collect();
        assert_eq!(ahead, [later[4].fingerprint]);
        let (z, m) = gz.compress_made(&next).unwrap();
        assert_eq!(m.ahead, 0, "a piece of an earlier refresh was taken");
        assert_eq!(gunzip(&z), concat(&next));
    }

    #[test]
    fn pieces_cost_little_size() {
        let fams = families(&[20_000; 4], 0);
        let data = concat(&fams);
        let whole = Family::new(String::from_utf8(data.clone()).unwrap());
        let one = Gzip::with_threads(1).compress(std::slice::from_ref(&whole)).unwrap().len();
        let four = Gzip::with_threads(4).compress(&fams).unwrap().len();
        // Random 16-hex ids and short values: a third of the text at most
        // (the deflate tests hold the ratio to a general deflater's).
        assert!(one * 3 < data.len(), "{one} of {}: the text barely compressed", data.len());
        assert!(four * 100 <= one * 101, "4 pieces {four} vs 1 piece {one} bytes");
    }

    #[test]
    fn small_families_share_pieces_and_big_ones_stand_alone() {
        let fam = |n: usize| Family::new("x".repeat(n));
        let lens = |fams: &[Family]| -> Vec<usize> { group(fams).iter().map(|g| g.len()).collect() };
        assert_eq!(lens(&[]), Vec::<usize>::new());
        assert_eq!(lens(&[fam(1), fam(2)]), [2]);
        assert_eq!(lens(&[fam(1), fam(MIN_PIECE), fam(3)]), [1, 1, 1]);
        assert_eq!(lens(&vec![fam(MIN_PIECE / 2); 5]), [2, 2, 1]);
    }

    #[test]
    fn little_work_stays_on_the_calling_thread() {
        let gz = Gzip::with_threads(4);
        assert_eq!(gz.compress_made(&families(&[100, 100], 0)).unwrap().1.threads, 1);
        let big = families(&[6000; 6], 0);
        assert!(big.iter().map(|f| f.text.len()).sum::<usize>() >= SPLIT_FROM);
        assert_eq!(gz.compress_made(&big).unwrap().1.threads, 4);
        assert_eq!(Gzip::with_threads(64).threads, MAX_THREADS);
    }

    #[test]
    fn the_system_gzip_reads_it_too() {
        // A second, independent inflater: gzip(1), essential on Debian.
        let mut child = std::process::Command::new("gzip")
            .args(["-dc"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("gzip(1)");
        let fams = families(&[6000, 1, 6000, 6000], 0);
        let z = Gzip::with_threads(3).compress(&fams).unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write as _;
            stdin.write_all(&z).unwrap();
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(out.status.success(), "gzip -dc failed: {}", out.status);
        assert_eq!(out.stdout, concat(&fams));
    }
}
