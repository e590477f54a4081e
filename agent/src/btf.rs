//! Just enough of a BTF reader to find a struct member's offset in the
//! running kernel, e.g. `task_struct.se.sum_exec_runtime`.
//!
//! The kernel programs are built without CO-RE relocations (Rust has no
//! `preserve_access_index`), so the agent looks offsets up in
//! `/sys/kernel/btf/vmlinux` and hands them to the programs as globals.
//! aya parses BTF too but keeps member access crate-private.
//!
//! Why not the `btfparse` crate (Apache-2.0, no dependencies, member-offset
//! lookup by dotted path)? Tried on 2026-12-04 against this module on
//! kernel 6.18's vmlinux: both found the same 8 offsets, but btfparse took
//! ~90 ms and ~55 MB more RSS at start-up (it copies every name into owned
//! maps; ours: 0.8 ms, ~4 MB, lookups alike at ~30 µs), added ~110 KB to
//! the binary (ours ~12 KB), and on crafted BTF it looped forever (a
//! typedef naming itself) or aborted the process on a stack overflow (an
//! anonymous member containing itself, 100,000 nested anonymous structs),
//! where this reader returns an error: the agent reads BTF from the node,
//! and a hang or abort at start-up is worse than a refusal. Its one name
//! map across all kinds also hides 229 struct names behind later types of
//! the same name in that vmlinux. This reader stays; the fuzz target
//! `btf` keeps it honest.
//!
//! Format: <https://docs.kernel.org/bpf/btf.html>.

/// Why an offset could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// Not BTF, or truncated.
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    /// A kind this reader does not know: a newer kernel's BTF.
    #[error("unknown BTF kind {0}")]
    UnknownKind(u32),
    /// The struct or member does not exist in this kernel.
    #[error("no {0} in kernel BTF")]
    NotFound(String),
}

/// How many typedefs and qualifiers a type may go through, and how deep
/// anonymous members may nest: far beyond any kernel's, and a crafted cycle
/// ends in an error instead of a loop or a stack overflow.
const MAX_DEPTH: u32 = 32;
/// How many members one lookup may look at in all (nested anonymous members
/// shared by many parents would otherwise multiply); the kernel's
/// `task_struct` needs a few hundred.
const MAX_VISITS: u32 = 1 << 20;

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_ENUM64: u32 = 19;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

struct Type<'a> {
    name_off: u32,
    info: u32,
    size_or_type: u32,
    extra: &'a [u8],
}

impl Type<'_> {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }
    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }
}

/// A parsed BTF blob.
pub struct Btf<'a> {
    /// Index = type id; id 0 is `void`.
    types: Vec<Type<'a>>,
    strings: &'a [u8],
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl<'a> Btf<'a> {
    /// Parses little-endian BTF (the only kind podmeter's targets produce).
    pub fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        if data.get(0..2) != Some(&[0x9f, 0xeb][..]) {
            return Err(BtfError::Malformed("bad magic"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or(BtfError::Malformed("section out of bounds"))
        };
        let (mut rest, strings) = (section(type_off, type_len)?, section(str_off, str_len)?);
        let mut types = vec![Type {
            name_off: 0,
            info: 0,
            size_or_type: 0,
            extra: &[],
        }];
        while !rest.is_empty() {
            let (name_off, info, size_or_type) =
                (u32_at(rest, 0)?, u32_at(rest, 4)?, u32_at(rest, 8)?);
            let t = Type {
                name_off,
                info,
                size_or_type,
                extra: &[],
            };
            let vlen = t.vlen();
            let extra_len = match t.kind() {
                1 | 14 | 17 => 4,             // int, var, decl_tag
                2 | 7..=12 | 16 | 18 => 0, // ptr, fwd, typedef, qualifiers, func, float, type_tag
                3 => 12,                   // array
                4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
                6 | 13 => 8 * vlen,        // enum, func_proto
                k => return Err(BtfError::UnknownKind(k)),
            };
            let extra = rest
                .get(12..12 + extra_len)
                .ok_or(BtfError::Malformed("truncated type"))?;
            types.push(Type { extra, ..t });
            rest = &rest[12 + extra_len..];
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or_default()
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn resolve(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..MAX_DEPTH {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind(),
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_or_type;
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::Malformed("typedef chain too long (a cycle?)"))
    }

    fn struct_id(&self, name: &str) -> Option<u32> {
        (1..self.types.len() as u32).find(|&id| {
            let t = &self.types[id as usize];
            t.kind() == KIND_STRUCT && t.vlen() > 0 && self.name(t.name_off) == name
        })
    }

    /// `(member type id, bit offset, bitfield size)` of `member` in
    /// struct/union `id` (the size is 0 for a plain member),
    /// looking inside anonymous members (randomised layouts nest them), at
    /// most [`MAX_DEPTH`] deep and [`MAX_VISITS`] members in all (`visits`
    /// counts down).
    fn member(
        &self,
        id: u32,
        member: &str,
        depth: u32,
        visits: &mut u32,
    ) -> Result<Option<(u32, u32, u32)>, BtfError> {
        if depth >= MAX_DEPTH {
            return Err(BtfError::Malformed(
                "anonymous members nested too deep (a cycle?)",
            ));
        }
        let Some(t) = self.types.get(id as usize) else {
            return Ok(None);
        };
        if !matches!(t.kind(), KIND_STRUCT | KIND_UNION) {
            return Ok(None);
        }
        for m in t.extra.chunks_exact(12) {
            *visits = visits
                .checked_sub(1)
                .ok_or(BtfError::Malformed("too many members to look through"))?;
            let (name_off, ty, raw) = (u32_at(m, 0)?, u32_at(m, 4)?, u32_at(m, 8)?);
            // With kind_flag the top 8 bits are the bitfield size (what
            // pahole emits for every struct that has bitfields).
            let (bits, bitfield) = if t.kind_flag() {
                (raw & 0x00ff_ffff, raw >> 24)
            } else {
                (raw, 0)
            };
            if name_off == 0 {
                let inner = self.member(self.resolve(ty)?, member, depth + 1, visits)?;
                if let Some((mt, inner, bitfield)) = inner {
                    let bits = bits
                        .checked_add(inner)
                        .ok_or(BtfError::Malformed("a member's offset overflows"))?;
                    return Ok(Some((mt, bits, bitfield)));
                }
            } else if self.name(name_off) == member {
                return Ok(Some((ty, bits, bitfield)));
            }
        }
        Ok(None)
    }

    /// Byte offset of a member path such as `task_struct` → `["se", "sum_exec_runtime"]`.
    pub fn offset(&self, struct_name: &str, path: &[&str]) -> Result<u64, BtfError> {
        let mut id = self
            .struct_id(struct_name)
            .ok_or_else(|| BtfError::NotFound(format!("struct {struct_name}")))?;
        let mut bits = 0u64;
        for (i, m) in path.iter().enumerate() {
            let mut visits = MAX_VISITS;
            let (ty, off, bitfield) = self.member(id, m, 0, &mut visits)?.ok_or_else(|| {
                BtfError::NotFound(format!("{struct_name}.{}", path[..=i].join(".")))
            })?;
            if bitfield != 0 {
                // A byte offset cannot name a bitfield, even one that
                // starts on a byte boundary.
                return Err(BtfError::NotFound(format!(
                    "{struct_name}.{} other than a bitfield",
                    path[..=i].join(".")
                )));
            }
            bits += u64::from(off);
            id = self.resolve(ty)?;
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::NotFound(format!(
                "byte-aligned {struct_name}.{}",
                path.join(".")
            )));
        }
        Ok(bits / 8)
    }

    /// The value of enumerator `value` of `enum name`, such as
    /// `cgroup_subsys_id` → `cpu_cgrp_id` (the kernel numbers its cgroup
    /// controllers by its configuration).
    pub fn enum_value(&self, name: &str, value: &str) -> Result<i64, BtfError> {
        let not_found = || BtfError::NotFound(format!("enum {name} value {value}"));
        let t = self
            .types
            .iter()
            .find(|t| matches!(t.kind(), KIND_ENUM | KIND_ENUM64) && self.name(t.name_off) == name)
            .ok_or_else(not_found)?;
        // enum: `{name, i32 value}`; enum64: `{name, low 32 bits, high 32}`.
        // kind_flag says signed; the kernel's ids are small either way.
        let width = if t.kind() == KIND_ENUM { 8 } else { 12 };
        for v in t.extra.chunks_exact(width) {
            if self.name(u32_at(v, 0)?) == value {
                let low = u32_at(v, 4)?;
                return Ok(if width == 8 {
                    i64::from(low as i32)
                } else {
                    (i64::from(u32_at(v, 8)?) << 32) | i64::from(low)
                });
            }
        }
        Err(not_found())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(Btf::parse(b""), Err(BtfError::Malformed(_))));
        assert!(matches!(
            Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0]),
            Err(BtfError::Malformed(_))
        ));
        let mut hdr = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, 12, 12, 1] {
            hdr.extend(v.to_le_bytes());
        }
        hdr.extend([0u8; 12]); // one type of kind 0 (void): unknown
        hdr.push(0);
        assert!(matches!(Btf::parse(&hdr), Err(BtfError::UnknownKind(0))));
    }

    /// Builds little-endian BTF blobs for tests: types are numbered from 1
    /// in the order they are added.
    #[derive(Default)]
    struct Blob {
        types: Vec<u8>,
        strings: Vec<u8>,
        count: u32,
    }

    impl Blob {
        fn name(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            if self.strings.is_empty() {
                self.strings.push(0);
            }
            let off = self.strings.len() as u32;
            self.strings.extend(name.as_bytes());
            self.strings.push(0);
            off
        }

        fn ty(
            &mut self,
            name: &str,
            kind: u32,
            vlen: u32,
            size_or_type: u32,
            extra: &[u32],
        ) -> u32 {
            let name_off = self.name(name);
            for v in [name_off, kind << 24 | vlen, size_or_type]
                .iter()
                .chain(extra)
            {
                self.types.extend(v.to_le_bytes());
            }
            self.count += 1;
            self.count
        }

        /// A struct of `(name, type id, bit offset)` members.
        fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            let extra: Vec<u32> = members
                .iter()
                .flat_map(|&(n, ty, bits)| [self.name(n), ty, bits])
                .collect();
            self.ty(name, KIND_STRUCT, members.len() as u32, size, &extra)
        }

        fn bytes(&self) -> Vec<u8> {
            let mut b = vec![0x9f, 0xeb, 1, 0];
            let (types, strings) = (self.types.len() as u32, self.strings.len() as u32);
            for v in [24, 0, types, types, strings] {
                b.extend(u32::to_le_bytes(v));
            }
            b.extend(&self.types);
            b.extend(&self.strings);
            b
        }
    }

    /// The shape of the kernel's `task_struct.se.sum_exec_runtime`, with a
    /// typedef, a qualifier and an anonymous struct in the way.
    fn tiny() -> Vec<u8> {
        let mut b = Blob::default();
        let int = b.ty("unsigned long long", 1, 0, 8, &[64]);
        let u64_ = b.ty("u64", KIND_TYPEDEF, 0, int, &[]);
        let se = b.strukt(
            "sched_entity",
            16,
            &[("load", int, 0), ("sum_exec_runtime", u64_, 64)],
        );
        let cse = b.ty("", KIND_CONST, 0, se, &[]);
        let anon = b.strukt("", 16, &[("se", cse, 0)]);
        b.strukt("task_struct", 32, &[("__state", int, 0), ("", anon, 128)]);
        b.bytes()
    }

    #[test]
    fn finds_members_through_anonymous_structs_and_typedefs() {
        let data = tiny();
        let btf = Btf::parse(&data).unwrap();
        let off = btf.offset("task_struct", &["se", "sum_exec_runtime"]);
        assert_eq!(off.unwrap(), 24);
        assert_eq!(btf.offset("task_struct", &["__state"]).unwrap(), 0);
        assert!(matches!(
            btf.offset("task_struct", &["se", "nothing"]),
            Err(BtfError::NotFound(_))
        ));
    }

    /// The fuzzer's seed (`fuzz/corpus/btf/tiny.btf`) is this blob;
    /// `PODMETER_BLESS=1` rewrites it.
    #[test]
    fn fuzz_seed_is_the_tiny_blob() {
        let seed =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/btf/tiny.btf");
        if std::env::var_os("PODMETER_BLESS").is_some() {
            std::fs::write(&seed, tiny()).unwrap();
        }
        let on_disk = std::fs::read(&seed).unwrap();
        assert!(
            on_disk == tiny(),
            "{} is stale: run with PODMETER_BLESS=1",
            seed.display()
        );
    }

    /// Found by the fuzzer: an anonymous member's offset plus its inner
    /// member's offset past 2^32 bits overflowed (a panic in debug builds).
    #[test]
    fn overflowing_offsets_are_errors() {
        let data = include_bytes!("../../fuzz/corpus/btf/overflowing-anonymous-offset");
        if let Ok(btf) = Btf::parse(data) {
            let _ = btf.offset("task_struct", &["se", "sum_exec_runtime"]);
            let _ = btf.offset("task_struct", &["cgroups"]);
            let _ = btf.offset("cgroup", &["kn", "id"]);
            let _ = btf.offset("sched_entity", &[]);
        }
    }

    #[test]
    fn enum_values() {
        let mut b = Blob::default();
        let extra = [b.name("cpuset_cgrp_id"), 0, b.name("cpu_cgrp_id"), 1];
        b.ty("cgroup_subsys_id", KIND_ENUM, 2, 4, &extra);
        let extra = [b.name("big"), 5, 1];
        b.ty("wide", KIND_ENUM64, 1, 8, &extra);
        let data = b.bytes();
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(
            btf.enum_value("cgroup_subsys_id", "cpu_cgrp_id").unwrap(),
            1
        );
        assert_eq!(
            btf.enum_value("cgroup_subsys_id", "cpuset_cgrp_id")
                .unwrap(),
            0
        );
        assert_eq!(btf.enum_value("wide", "big").unwrap(), (1 << 32) | 5);
        for (e, v) in [
            ("cgroup_subsys_id", "memory_cgrp_id"),
            ("nothing", "cpu_cgrp_id"),
        ] {
            let r = btf.enum_value(e, v);
            assert!(matches!(r, Err(BtfError::NotFound(_))), "{r:?}");
        }
    }

    #[test]
    fn bitfields_have_no_byte_offset() {
        // `struct task_struct { int x; unsigned a:1; }` as pahole writes it:
        // kind_flag set, the bitfield size in each member's top byte.
        let mut b = Blob::default();
        let extra = [b.name("x"), 0, 0, b.name("a"), 0, 1 << 24 | 32];
        b.ty("task_struct", KIND_STRUCT | 0x80, 2, 8, &extra);
        let data = b.bytes();
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.offset("task_struct", &["x"]).unwrap(), 0);
        let e = btf.offset("task_struct", &["a"]);
        assert!(matches!(e, Err(BtfError::NotFound(_))), "{e:?}");
    }

    #[test]
    fn cycles_are_errors_not_stack_overflows() {
        // A struct whose anonymous member is itself.
        let mut b = Blob::default();
        b.strukt("task_struct", 8, &[("", 1, 0)]);
        let data = b.bytes();
        let e = Btf::parse(&data).unwrap().offset("task_struct", &["se"]);
        assert!(matches!(e, Err(BtfError::Malformed(_))), "{e:?}");

        // Two typedefs naming each other.
        let mut b = Blob::default();
        b.strukt("task_struct", 8, &[("se", 2, 0)]);
        b.ty("a", KIND_TYPEDEF, 0, 3, &[]);
        b.ty("b", KIND_TYPEDEF, 0, 2, &[]);
        let data = b.bytes();
        let e = Btf::parse(&data)
            .unwrap()
            .offset("task_struct", &["se", "sum_exec_runtime"]);
        assert!(matches!(e, Err(BtfError::Malformed(_))), "{e:?}");

        // A chain of 100 000 anonymous structs, each inside the next.
        let mut b = Blob::default();
        b.strukt("leaf", 8, &[("x", 0, 0)]);
        for id in 1..100_000 {
            b.strukt("", 8, &[("", id, 0)]);
        }
        b.strukt("task_struct", 8, &[("", 100_000, 0)]);
        let data = b.bytes();
        let e = Btf::parse(&data).unwrap().offset("task_struct", &["x"]);
        assert!(matches!(e, Err(BtfError::Malformed(_))), "{e:?}");

        // Wide sharing: 30 levels of two anonymous members of the level
        // below (2^30 paths) is cut short by the visit budget.
        let mut b = Blob::default();
        let mut below = b.strukt("leaf", 8, &[("x", 0, 0)]);
        for _ in 0..30 {
            below = b.strukt("", 8, &[("", below, 0), ("", below, 0)]);
        }
        b.strukt("task_struct", 8, &[("", below, 0)]);
        let data = b.bytes();
        let e = Btf::parse(&data)
            .unwrap()
            .offset("task_struct", &["nothing"]);
        assert!(matches!(e, Err(BtfError::Malformed(_))), "{e:?}");
    }

    /// Against this machine's kernel, checked with bpftool's own reading.
    #[test]
    fn task_struct_offsets_match_bpftool() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux on this machine");
            return;
        };
        let btf = Btf::parse(&data).unwrap();
        let off = btf
            .offset("task_struct", &["se", "sum_exec_runtime"])
            .unwrap();
        assert!(off > 0 && off.is_multiple_of(8), "{off}");
        assert!(btf.offset("task_struct", &["no_such_member"]).is_err());
        assert!(btf.offset("no_such_struct", &["se"]).is_err());

        let Ok(out) = std::process::Command::new("bpftool")
            .args([
                "btf",
                "dump",
                "file",
                "/sys/kernel/btf/vmlinux",
                "format",
                "raw",
            ])
            .output()
        else {
            eprintln!("bpftool not installed: checked the offset's shape only");
            return;
        };
        let dump = String::from_utf8_lossy(&out.stdout);
        let member_bits = |st: &str, m: &str| -> u64 {
            let start = dump.find(&format!("STRUCT '{st}' size=")).unwrap();
            let block = &dump[start..];
            let line = block
                .lines()
                .skip(1)
                .take_while(|l| l.starts_with('\t'))
                .find(|l| l.contains(&format!("'{m}' type_id=")))
                .unwrap();
            line.split("bits_offset=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let expected = (member_bits("task_struct", "se")
            + member_bits("sched_entity", "sum_exec_runtime"))
            / 8;
        assert_eq!(off, expected);
    }
}
