//! A small reader of the kernel's BTF (BPF Type Format, `Documentation/bpf/btf.rst`).
//!
//! The kernel programs are built without CO-RE relocations, so every kernel struct member they read
//! is located here, from the running kernel's `/sys/kernel/btf/vmlinux`, and handed to them through
//! [`KernelOffsets`]. Only what that needs is decoded: type records are indexed so every kind can be
//! skipped, struct/union members are walked, names are compared. All reads are bounds-checked and
//! malformed data yields a [`BtfError`], never a panic.

use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use tracer_ebpf::abi::KernelOffsets;

/// Where the running kernel exposes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const VERSION: u8 = 1;
const HEADER_LEN: usize = 24;
const TYPE_RECORD_LEN: usize = 12;
const MEMBER_LEN: usize = 12;
/// Real vmlinux BTF is a few MiB; the cap only bounds memory when pointed at the wrong file.
const MAX_FILE_SIZE: u64 = 256 << 20;
/// Bounds typedef/modifier chains and anonymous-member nesting, so cyclic (malformed) BTF terminates.
const MAX_DEPTH: usize = 64;

/// Errors reading BTF or resolving a member in it.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The file could not be read.
    #[error("cannot read BTF from {path}: {source}")]
    Io {
        /// File that was read.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is implausibly large for BTF.
    #[error("BTF file {path} is larger than {max} bytes")]
    TooLarge {
        /// File that was read.
        path: PathBuf,
        /// Size limit in bytes.
        max: u64,
    },
    /// A structure extends past the end of the data.
    #[error(
        "BTF data truncated: {what} at byte {offset} needs {needed} bytes, {available} available"
    )]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Byte offset at which it starts.
        offset: usize,
        /// Bytes it needs.
        needed: usize,
        /// Bytes there are from `offset` on.
        available: usize,
    },
    /// Not BTF, or BTF of the other byte order.
    #[error("bad BTF magic {0:#06x} (expected 0xeb9f, little-endian)")]
    BadMagic(u16),
    /// A BTF version this parser does not know.
    #[error("unsupported BTF version {0} (expected 1)")]
    UnsupportedVersion(u8),
    /// The header is inconsistent.
    #[error("bad BTF header: {0}")]
    BadHeader(&'static str),
    /// A type record has a kind this parser cannot skip.
    #[error("BTF type {id} has unknown kind {kind}")]
    UnknownKind {
        /// Type id of the record.
        id: u32,
        /// Raw kind value.
        kind: u32,
    },
    /// A name offset points outside the string section or at an unterminated string.
    #[error("BTF string offset {0} is invalid")]
    BadString(u32),
    /// A type id refers to no type.
    #[error("BTF type id {0} does not exist")]
    BadTypeId(u32),
    /// A chain of typedefs/modifiers or anonymous members is deeper than any sane kernel's.
    #[error("BTF type {0} nests deeper than {MAX_DEPTH} levels (cyclic BTF?)")]
    TooDeep(u32),
    /// No struct or union of that name.
    #[error("struct {0} not found in kernel BTF")]
    StructNotFound(String),
    /// An empty member path was asked for.
    #[error("empty member path for struct {0}")]
    EmptyPath(String),
    /// The struct has no member of that name (also not inside anonymous members).
    #[error("member {path} not found in struct {struct_name}")]
    MemberNotFound {
        /// Outer struct.
        struct_name: String,
        /// Member path up to the missing member.
        path: String,
    },
    /// A member in the middle of the path is not a struct or union.
    #[error("{struct_name}.{path} is not a struct or union, cannot look up members in it")]
    NotComposite {
        /// Outer struct.
        struct_name: String,
        /// Member path up to the offending member.
        path: String,
    },
    /// The target member is a bitfield that cannot be read as whole bytes.
    #[error(
        "{struct_name}.{path} is a bitfield not byte aligned (bit offset {bit_offset}, {bits} bits)"
    )]
    UnalignedBitfield {
        /// Outer struct.
        struct_name: String,
        /// Member path.
        path: String,
        /// Offset in bits from the start of the outer struct.
        bit_offset: u64,
        /// Width in bits.
        bits: u32,
    },
    /// The byte offset does not fit in 32 bits.
    #[error("{struct_name}.{path} has an offset that does not fit in 32 bits")]
    OffsetOverflow {
        /// Outer struct.
        struct_name: String,
        /// Member path.
        path: String,
    },
}

/// The BTF type kinds (`BTF_KIND_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BtfKind {
    /// Integer.
    Int,
    /// Pointer.
    Ptr,
    /// Array.
    Array,
    /// Struct.
    Struct,
    /// Union.
    Union,
    /// Enum with 32-bit values.
    Enum,
    /// Forward declaration.
    Fwd,
    /// Typedef.
    Typedef,
    /// `volatile` modifier.
    Volatile,
    /// `const` modifier.
    Const,
    /// `restrict` modifier.
    Restrict,
    /// Function (name and prototype).
    Func,
    /// Function prototype.
    FuncProto,
    /// Variable.
    Var,
    /// Data section.
    Datasec,
    /// Floating point.
    Float,
    /// Declaration tag.
    DeclTag,
    /// Type tag.
    TypeTag,
    /// Enum with 64-bit values.
    Enum64,
}

impl BtfKind {
    fn from_raw(kind: u32) -> Option<Self> {
        Some(match kind {
            1 => Self::Int,
            2 => Self::Ptr,
            3 => Self::Array,
            4 => Self::Struct,
            5 => Self::Union,
            6 => Self::Enum,
            7 => Self::Fwd,
            8 => Self::Typedef,
            9 => Self::Volatile,
            10 => Self::Const,
            11 => Self::Restrict,
            12 => Self::Func,
            13 => Self::FuncProto,
            14 => Self::Var,
            15 => Self::Datasec,
            16 => Self::Float,
            17 => Self::DeclTag,
            18 => Self::TypeTag,
            19 => Self::Enum64,
            _ => return None,
        })
    }

    /// Bytes of kind-specific data that follow the common 12-byte record.
    fn trailing_len(self, vlen: usize) -> usize {
        match self {
            Self::Int | Self::Var | Self::DeclTag => 4,
            Self::Array => 12,
            Self::Struct | Self::Union | Self::Datasec | Self::Enum64 => 12 * vlen,
            Self::Enum | Self::FuncProto => 8 * vlen,
            Self::Ptr
            | Self::Fwd
            | Self::Typedef
            | Self::Volatile
            | Self::Const
            | Self::Restrict
            | Self::Func
            | Self::Float
            | Self::TypeTag => 0,
        }
    }

    fn is_composite(self) -> bool {
        matches!(self, Self::Struct | Self::Union)
    }

    /// Kinds that only qualify or rename another type.
    fn is_alias(self) -> bool {
        matches!(
            self,
            Self::Typedef | Self::Volatile | Self::Const | Self::Restrict | Self::TypeTag
        )
    }
}

/// One type record, with its kind-specific data left in place.
#[derive(Clone, Copy, Debug)]
struct TypeEntry {
    name_off: u32,
    kind: BtfKind,
    kind_flag: bool,
    vlen: u16,
    /// `size` or `type`, depending on the kind.
    size_or_type: u32,
    /// Absolute offset of the kind-specific data in [`Btf::data`].
    trailing: usize,
}

/// A member found in a struct, its offset relative to the struct searched.
#[derive(Clone, Copy, Debug)]
struct Member {
    type_id: u32,
    bit_offset: u64,
    /// Non-zero for bitfields declared through the struct's `kind_flag`.
    bitfield_bits: u32,
}

/// Parsed BTF: the raw bytes plus an index of the type records.
pub struct Btf {
    data: Vec<u8>,
    strings: Range<usize>,
    /// Type id `n` is `types[n - 1]`; id 0 is `void`.
    types: Vec<TypeEntry>,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("bytes", &self.data.len())
            .field("types", &self.types.len())
            .finish()
    }
}

fn read_u8(bytes: &[u8], offset: usize, what: &'static str) -> Result<u8, BtfError> {
    bytes.get(offset).copied().ok_or(BtfError::Truncated {
        what,
        offset,
        needed: 1,
        available: 0,
    })
}

fn read_u16(bytes: &[u8], offset: usize, what: &'static str) -> Result<u16, BtfError> {
    let raw = read_array::<2>(bytes, offset, what)?;
    Ok(u16::from_le_bytes(raw))
}

fn read_u32(bytes: &[u8], offset: usize, what: &'static str) -> Result<u32, BtfError> {
    let raw = read_array::<4>(bytes, offset, what)?;
    Ok(u32::from_le_bytes(raw))
}

fn read_array<const N: usize>(
    bytes: &[u8],
    offset: usize,
    what: &'static str,
) -> Result<[u8; N], BtfError> {
    offset
        .checked_add(N)
        .and_then(|end| bytes.get(offset..end))
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or(BtfError::Truncated {
            what,
            offset,
            needed: N,
            available: bytes.len().saturating_sub(offset),
        })
}

/// Byte range of a section given its header offset and length, checked against the data.
fn section(
    bytes: &[u8],
    hdr_len: usize,
    off: u32,
    len: u32,
    what: &'static str,
) -> Result<Range<usize>, BtfError> {
    let start = hdr_len as u64 + u64::from(off);
    let end = start + u64::from(len);
    if end > bytes.len() as u64 {
        let offset = usize::try_from(start).unwrap_or(usize::MAX);
        return Err(BtfError::Truncated {
            what,
            offset,
            needed: len as usize,
            available: bytes.len().saturating_sub(offset),
        });
    }
    // Both fit in usize: they are at most bytes.len().
    Ok(start as usize..end as usize)
}

/// Checks the header and indexes the type records; returns the string range and the index.
fn index(bytes: &[u8]) -> Result<(Range<usize>, Vec<TypeEntry>), BtfError> {
    let magic = read_u16(bytes, 0, "header magic")?;
    if magic != MAGIC {
        return Err(BtfError::BadMagic(magic));
    }
    let version = read_u8(bytes, 2, "header version")?;
    if version != VERSION {
        return Err(BtfError::UnsupportedVersion(version));
    }
    let hdr_len = read_u32(bytes, 4, "header length")? as usize;
    if hdr_len < HEADER_LEN {
        return Err(BtfError::BadHeader("header shorter than 24 bytes"));
    }
    if hdr_len > bytes.len() {
        return Err(BtfError::Truncated {
            what: "header",
            offset: 0,
            needed: hdr_len,
            available: bytes.len(),
        });
    }
    let type_off = read_u32(bytes, 8, "header")?;
    let type_len = read_u32(bytes, 12, "header")?;
    let str_off = read_u32(bytes, 16, "header")?;
    let str_len = read_u32(bytes, 20, "header")?;
    let types = section(bytes, hdr_len, type_off, type_len, "type section")?;
    let strings = section(bytes, hdr_len, str_off, str_len, "string section")?;
    if bytes.get(strings.start) != Some(&0) {
        return Err(BtfError::BadHeader(
            "string section must start with the empty string",
        ));
    }

    let mut entries = Vec::new();
    let mut pos = types.start;
    while pos < types.end {
        let id =
            u32::try_from(entries.len() + 1).map_err(|_| BtfError::BadHeader("too many types"))?;
        let record = bytes.get(pos..types.end).unwrap_or_default();
        if record.len() < TYPE_RECORD_LEN {
            return Err(BtfError::Truncated {
                what: "type record",
                offset: pos,
                needed: TYPE_RECORD_LEN,
                available: record.len(),
            });
        }
        let name_off = read_u32(record, 0, "type record")?;
        let info = read_u32(record, 4, "type record")?;
        let size_or_type = read_u32(record, 8, "type record")?;
        let raw_kind = (info >> 24) & 0x1f;
        let kind =
            BtfKind::from_raw(raw_kind).ok_or(BtfError::UnknownKind { id, kind: raw_kind })?;
        let vlen = (info & 0xffff) as u16;
        let len = TYPE_RECORD_LEN + kind.trailing_len(usize::from(vlen));
        if record.len() < len {
            return Err(BtfError::Truncated {
                what: "type record",
                offset: pos,
                needed: len,
                available: record.len(),
            });
        }
        entries.push(TypeEntry {
            name_off,
            kind,
            kind_flag: info >> 31 == 1,
            vlen,
            size_or_type,
            trailing: pos + TYPE_RECORD_LEN,
        });
        pos += len;
    }
    entries.shrink_to_fit();
    Ok((strings, entries))
}

impl Btf {
    /// Reads and parses a BTF file, e.g. [`VMLINUX_BTF`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, BtfError> {
        let path = path.as_ref();
        let io_err = |source| BtfError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io_err)?;
        let mut data = Vec::new();
        file.take(MAX_FILE_SIZE + 1)
            .read_to_end(&mut data)
            .map_err(io_err)?;
        if data.len() as u64 > MAX_FILE_SIZE {
            return Err(BtfError::TooLarge {
                path: path.to_owned(),
                max: MAX_FILE_SIZE,
            });
        }
        Self::from_vec(data)
    }

    /// Parses BTF from raw bytes (header, type and string sections).
    #[cfg(test)]
    pub fn parse(bytes: &[u8]) -> Result<Self, BtfError> {
        Self::from_vec(bytes.to_vec())
    }

    fn from_vec(data: Vec<u8>) -> Result<Self, BtfError> {
        let (strings, types) = index(&data)?;
        Ok(Self {
            data,
            strings,
            types,
        })
    }

    /// Number of types (ids `1..=type_count()`).
    pub fn type_count(&self) -> usize {
        self.types.len()
    }

    /// Id of the first type of `kind` named `name`.
    pub fn type_id_by_name(&self, kind: BtfKind, name: &str) -> Option<u32> {
        self.ids_named(name, |k| k == kind).next()
    }

    #[cfg(test)]
    /// Whether the kernel has a function `name` (a possible fentry/kprobe target).
    pub fn has_func(&self, name: &str) -> bool {
        self.type_id_by_name(BtfKind::Func, name).is_some()
    }

    #[cfg(test)]
    /// Size in bytes of the struct or union `name`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        self.ids_named(name, BtfKind::is_composite)
            .next()
            .and_then(|id| self.entry(id).ok())
            .map(|t| t.size_or_type)
            .ok_or_else(|| BtfError::StructNotFound(name.to_owned()))
    }

    /// Byte offset of the member at `path` (e.g. `["__sk_common", "skc_family"]`) in struct or
    /// union `struct_name`. Members of anonymous structs/unions are found as if they were direct
    /// members, and path components may go through typedefs and qualifiers.
    pub fn member_offset(&self, struct_name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut first_err = None;
        // Deduplicated vmlinux BTF has one definition per name, but same-named structs from
        // different compilation units can survive; the one that has the member wins.
        for id in self.ids_named(struct_name, BtfKind::is_composite) {
            match self.member_offset_in(id, struct_name, path) {
                Ok(offset) => return Ok(offset),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| BtfError::StructNotFound(struct_name.to_owned())))
    }

    fn member_offset_in(&self, id: u32, struct_name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let Some((last, parents)) = path.split_last() else {
            return Err(BtfError::EmptyPath(struct_name.to_owned()));
        };
        let mut composite = id;
        let mut bit_offset = 0u64;
        for (i, name) in parents.iter().enumerate() {
            let member = self.named_member(composite, name, struct_name, &path[..=i])?;
            bit_offset += member.bit_offset;
            let target = self.resolve(member.type_id)?;
            if !self.is_composite(target)? {
                return Err(BtfError::NotComposite {
                    struct_name: struct_name.to_owned(),
                    path: path[..=i].join("."),
                });
            }
            composite = target;
        }
        let member = self.named_member(composite, last, struct_name, path)?;
        bit_offset += member.bit_offset;
        let width = if member.bitfield_bits != 0 {
            Some(member.bitfield_bits)
        } else {
            let (int_offset, width) = self.int_bitfield(member.type_id)?;
            bit_offset += u64::from(int_offset);
            width
        };
        if !bit_offset.is_multiple_of(8) || width.is_some_and(|bits| !bits.is_multiple_of(8)) {
            return Err(BtfError::UnalignedBitfield {
                struct_name: struct_name.to_owned(),
                path: path.join("."),
                bit_offset,
                bits: width.unwrap_or(0),
            });
        }
        u32::try_from(bit_offset / 8).map_err(|_| BtfError::OffsetOverflow {
            struct_name: struct_name.to_owned(),
            path: path.join("."),
        })
    }

    fn named_member(
        &self,
        composite: u32,
        name: &str,
        struct_name: &str,
        shown: &[&str],
    ) -> Result<Member, BtfError> {
        self.find_member(composite, name.as_bytes(), 0)?
            .ok_or_else(|| BtfError::MemberNotFound {
                struct_name: struct_name.to_owned(),
                path: shown.join("."),
            })
    }

    /// Searches `composite`'s members, descending into anonymous struct/union members.
    fn find_member(
        &self,
        composite: u32,
        name: &[u8],
        depth: usize,
    ) -> Result<Option<Member>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::TooDeep(composite));
        }
        let t = *self.entry(composite)?;
        for index in 0..usize::from(t.vlen) {
            let at = t.trailing + index * MEMBER_LEN;
            let name_off = read_u32(&self.data, at, "struct member")?;
            let type_id = read_u32(&self.data, at + 4, "struct member")?;
            let raw_offset = read_u32(&self.data, at + 8, "struct member")?;
            let (bit_offset, bitfield_bits) = if t.kind_flag {
                (raw_offset & 0x00ff_ffff, raw_offset >> 24)
            } else {
                (raw_offset, 0)
            };
            let bit_offset = u64::from(bit_offset);
            if name_off != 0 {
                if self.name_bytes(name_off)? == name {
                    return Ok(Some(Member {
                        type_id,
                        bit_offset,
                        bitfield_bits,
                    }));
                }
                continue;
            }
            let inner = self.resolve(type_id)?;
            if self.is_composite(inner)?
                && let Some(found) = self.find_member(inner, name, depth + 1)?
            {
                return Ok(Some(Member {
                    bit_offset: found.bit_offset + bit_offset,
                    ..found
                }));
            }
        }
        Ok(None)
    }

    /// For an integer declared as a (pre-`kind_flag` style) bitfield: its extra bit offset and
    /// width; `(0, None)` for anything else.
    fn int_bitfield(&self, type_id: u32) -> Result<(u32, Option<u32>), BtfError> {
        let id = self.resolve(type_id)?;
        if id == 0 {
            return Ok((0, None));
        }
        let t = *self.entry(id)?;
        if t.kind != BtfKind::Int {
            return Ok((0, None));
        }
        let encoding = read_u32(&self.data, t.trailing, "int encoding")?;
        let offset = (encoding >> 16) & 0xff;
        let bits = encoding & 0xff;
        if offset != 0 || u64::from(bits) != u64::from(t.size_or_type) * 8 {
            Ok((offset, Some(bits)))
        } else {
            Ok((0, None))
        }
    }

    /// Follows typedefs and qualifiers to the underlying type id (0 for `void`).
    fn resolve(&self, type_id: u32) -> Result<u32, BtfError> {
        let mut id = type_id;
        for _ in 0..MAX_DEPTH {
            if id == 0 {
                return Ok(0);
            }
            let t = self.entry(id)?;
            if !t.kind.is_alias() {
                return Ok(id);
            }
            id = t.size_or_type;
        }
        Err(BtfError::TooDeep(type_id))
    }

    fn is_composite(&self, id: u32) -> Result<bool, BtfError> {
        Ok(id != 0 && self.entry(id)?.kind.is_composite())
    }

    fn entry(&self, id: u32) -> Result<&TypeEntry, BtfError> {
        id.checked_sub(1)
            .and_then(|index| self.types.get(index as usize))
            .ok_or(BtfError::BadTypeId(id))
    }

    /// Ids of the types whose kind passes `kind` and whose name is `name`.
    fn ids_named<'a>(
        &'a self,
        name: &'a str,
        kind: impl Fn(BtfKind) -> bool + 'a,
    ) -> impl Iterator<Item = u32> + 'a {
        self.types
            .iter()
            .zip(1u32..)
            .filter(move |(t, _)| {
                t.name_off != 0
                    && kind(t.kind)
                    && self
                        .name_bytes(t.name_off)
                        .is_ok_and(|n| n == name.as_bytes())
            })
            .map(|(_, id)| id)
    }

    fn name_bytes(&self, offset: u32) -> Result<&[u8], BtfError> {
        let strings = self.data.get(self.strings.clone()).unwrap_or_default();
        let rest = strings
            .get(offset as usize..)
            .ok_or(BtfError::BadString(offset))?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(BtfError::BadString(offset))?;
        Ok(&rest[..end])
    }
}

/// Resolves every offset the kernel programs need from the running kernel's BTF.
pub fn resolve_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    let common = |field: &str| btf.member_offset("sock", &["__sk_common", field]);
    Ok(KernelOffsets {
        task_files: btf.member_offset("task_struct", &["files"])?,
        files_fdt: btf.member_offset("files_struct", &["fdt"])?,
        fdt_max_fds: btf.member_offset("fdtable", &["max_fds"])?,
        fdt_fd: btf.member_offset("fdtable", &["fd"])?,
        file_inode: btf.member_offset("file", &["f_inode"])?,
        file_private_data: btf.member_offset("file", &["private_data"])?,
        file_f_op: btf.member_offset("file", &["f_op"])?,
        inode_mode: btf.member_offset("inode", &["i_mode"])?,
        socket_sk: btf.member_offset("socket", &["sk"])?,
        sk_family: common("skc_family")?,
        sk_daddr: common("skc_daddr")?,
        sk_rcv_saddr: common("skc_rcv_saddr")?,
        sk_dport: common("skc_dport")?,
        sk_num: common("skc_num")?,
        sk_v6_daddr: common("skc_v6_daddr")?,
        sk_v6_rcv_saddr: common("skc_v6_rcv_saddr")?,
        sk_type: btf.member_offset("sock", &["sk_type"])?,
        sk_protocol: btf.member_offset("sock", &["sk_protocol"])?,
        task_stack: btf.member_offset("task_struct", &["stack"])?,
        tcp_write_seq: btf.member_offset("tcp_sock", &["write_seq"])?,
        tcp_copied_seq: btf.member_offset("tcp_sock", &["copied_seq"])?,
        // Only a bound for the trace id handed over on local connections: optional.
        msg_iter_count: btf
            .member_offset("msghdr", &["msg_iter", "count"])
            .unwrap_or(0),
        // Optional (a bitfield, which does not resolve, in older kernels): without it
        // connections open and close at their syscalls.
        sk_shutdown: btf.member_offset("sock", &["sk_shutdown"]).unwrap_or(0),
        // Optional: without them, reads at the socket layer read the clock themselves.
        tcp_clock_cache: btf
            .member_offset("tcp_sock", &["tcp_clock_cache"])
            .unwrap_or(0),
        sk_user_data: btf.member_offset("sock", &["sk_user_data"]).unwrap_or(0),
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIND_INT: u32 = 1;
    const KIND_STRUCT: u32 = 4;
    const KIND_UNION: u32 = 5;
    const KIND_TYPEDEF: u32 = 8;
    const KIND_CONST: u32 = 10;
    const KIND_FUNC: u32 = 12;

    /// Assembles little-endian BTF for tests.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        fn name(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn raw(
            &mut self,
            name: &str,
            kind: u32,
            flag: bool,
            vlen: u32,
            st: u32,
            extra: &[u32],
        ) -> u32 {
            let name_off = self.name(name);
            let info = (u32::from(flag) << 31) | (kind << 24) | vlen;
            for word in [name_off, info, st].iter().chain(extra) {
                self.types.extend_from_slice(&word.to_le_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }

        fn int(&mut self, name: &str, size: u32, bits: u32, offset: u32) -> u32 {
            self.raw(name, KIND_INT, false, 0, size, &[(offset << 16) | bits])
        }

        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            flag: bool,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let mut extra = Vec::new();
            for &(member, ty, offset) in members {
                extra.extend([self.name(member), ty, offset]);
            }
            self.raw(name, kind, flag, members.len() as u32, size, &extra)
        }

        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.push(VERSION);
            out.push(0);
            out.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.strings.len() as u32).to_le_bytes());
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A `sock`-like layout: named struct inside, anonymous unions/structs, typedef'd and const
    /// members, a kind_flag bitfield struct and a legacy int bitfield.
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        let u32_t = b.int("u32", 4, 32, 0);
        let u16_t = b.int("u16", 2, 16, 0);
        let be32 = b.raw("__be32", KIND_TYPEDEF, false, 0, u32_t, &[]);
        let pair = b.composite(
            KIND_STRUCT,
            "",
            8,
            false,
            &[("daddr", be32, 0), ("saddr", be32, 32)],
        );
        let addr_union = b.composite(
            KIND_UNION,
            "",
            8,
            false,
            &[("addrpair", u32_t, 0), ("", pair, 0)],
        );
        let common = b.composite(
            KIND_STRUCT,
            "common",
            16,
            false,
            &[
                ("", addr_union, 0),
                ("family", u16_t, 64),
                ("port", u16_t, 80),
            ],
        );
        let common_td = b.raw("common_t", KIND_TYPEDEF, false, 0, common, &[]);
        let common_const = b.raw("", KIND_CONST, false, 0, common_td, &[]);
        // kind_flag: offset bits 0-23, bitfield size bits 24-31.
        let flags = b.composite(
            KIND_STRUCT,
            "flags",
            4,
            true,
            &[
                ("whole", u16_t, 0),
                ("byte", u32_t, (8 << 24) | 16),
                ("nibble", u32_t, (4 << 24) | 24),
            ],
        );
        let legacy_bits = b.int("", 4, 8, 8);
        b.composite(
            KIND_STRUCT,
            "sock",
            40,
            false,
            &[
                ("common", common_const, 0),
                ("flags", flags, 128),
                ("legacy", legacy_bits, 160),
                ("tail", u32_t, 256),
                ("num", u32_t, 288),
            ],
        );
        b.raw("do_thing", KIND_FUNC, false, 1, 0, &[]);
        b.build()
    }

    #[test]
    fn walks_anonymous_members_typedefs_and_qualifiers() {
        let btf = Btf::parse(&sample()).expect("sample parses");
        assert_eq!(
            btf.member_offset("sock", &["common", "daddr"]).ok(),
            Some(0)
        );
        assert_eq!(
            btf.member_offset("sock", &["common", "saddr"]).ok(),
            Some(4)
        );
        assert_eq!(
            btf.member_offset("sock", &["common", "family"]).ok(),
            Some(8)
        );
        assert_eq!(
            btf.member_offset("sock", &["common", "port"]).ok(),
            Some(10)
        );
        assert_eq!(btf.member_offset("common", &["saddr"]).ok(), Some(4));
        assert_eq!(btf.member_offset("sock", &["tail"]).ok(), Some(32));
        assert_eq!(btf.member_offset("sock", &["num"]).ok(), Some(36));
        assert_eq!(btf.struct_size("sock").ok(), Some(40));
    }

    #[test]
    fn bitfields_must_be_byte_aligned() {
        let btf = Btf::parse(&sample()).expect("sample parses");
        assert_eq!(
            btf.member_offset("sock", &["flags", "whole"]).ok(),
            Some(16)
        );
        assert_eq!(btf.member_offset("sock", &["flags", "byte"]).ok(), Some(18));
        let err = btf.member_offset("sock", &["flags", "nibble"]);
        assert!(
            matches!(
                &err,
                Err(BtfError::UnalignedBitfield {
                    bits: 4,
                    bit_offset: 152,
                    ..
                })
            ),
            "{err:?}"
        );
        // Legacy bitfield: the int's own bit offset (8) adds to the member's.
        assert_eq!(btf.member_offset("sock", &["legacy"]).ok(), Some(21));
    }

    #[test]
    fn lookup_errors_name_what_is_missing() {
        let btf = Btf::parse(&sample()).expect("sample parses");
        let err = btf.member_offset("sock", &["common", "nope"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "member common.nope not found in struct sock"
        );
        let err = btf.member_offset("nosuch", &["x"]).unwrap_err();
        assert_eq!(err.to_string(), "struct nosuch not found in kernel BTF");
        let err = btf.member_offset("sock", &["tail", "x"]).unwrap_err();
        assert!(
            matches!(err, BtfError::NotComposite { ref path, .. } if path == "tail"),
            "{err}"
        );
        assert!(matches!(
            btf.member_offset("sock", &[]),
            Err(BtfError::EmptyPath(_))
        ));
        assert!(btf.has_func("do_thing"));
        assert!(!btf.has_func("sock"));
        assert!(!btf.has_func("other"));
    }

    #[test]
    fn skips_every_kind() {
        let mut b = Builder::new();
        let int = b.int("int", 4, 32, 0);
        b.raw("", 2, false, 0, int, &[]); // PTR
        b.raw("", 3, false, 0, 0, &[int, int, 4]); // ARRAY
        b.composite(KIND_STRUCT, "s", 4, false, &[("a", int, 0)]);
        b.composite(KIND_UNION, "u", 4, false, &[("a", int, 0), ("b", int, 0)]);
        b.raw("e", 6, false, 2, 4, &[0, 1, 0, 2]); // ENUM
        b.raw("f", 7, false, 0, 0, &[]); // FWD
        b.raw("t", KIND_TYPEDEF, false, 0, int, &[]);
        b.raw("", 9, false, 0, int, &[]); // VOLATILE
        b.raw("", KIND_CONST, false, 0, int, &[]);
        b.raw("", 11, false, 0, int, &[]); // RESTRICT
        let proto = b.raw("", 13, false, 2, int, &[0, int, 0, int]); // FUNC_PROTO
        b.raw("fn1", KIND_FUNC, false, 1, proto, &[]);
        let var = b.raw("v", 14, false, 0, int, &[1]); // VAR
        b.raw(".data", 15, false, 1, 4, &[var, 0, 4]); // DATASEC
        b.raw("double", 16, false, 0, 8, &[]); // FLOAT
        b.raw("tag", 17, false, 0, var, &[u32::MAX]); // DECL_TAG
        b.raw("tag2", 18, false, 0, int, &[]); // TYPE_TAG
        b.raw("e64", 19, false, 1, 8, &[0, 1, 2]); // ENUM64
        let last = b.raw("fn2", KIND_FUNC, false, 1, proto, &[]);
        let btf = Btf::parse(&b.build()).expect("parses");
        assert_eq!(btf.type_count(), last as usize);
        assert_eq!(btf.type_id_by_name(BtfKind::Func, "fn2"), Some(last));
        assert_eq!(btf.type_id_by_name(BtfKind::Enum64, "e64"), Some(last - 1));
        assert_eq!(btf.type_id_by_name(BtfKind::Fwd, "f"), Some(7));
    }

    #[test]
    fn cycles_and_bad_ids_are_errors() {
        let mut b = Builder::new();
        // Typedef 1 -> 2 -> 1.
        b.raw("a", KIND_TYPEDEF, false, 0, 2, &[]);
        b.raw("b", KIND_TYPEDEF, false, 0, 1, &[]);
        b.composite(KIND_STRUCT, "s", 8, false, &[("x", 1, 0), ("", 1, 0)]);
        b.composite(KIND_STRUCT, "t", 8, false, &[("", 99, 0)]);
        // An anonymous member that is the struct itself.
        b.composite(KIND_STRUCT, "r", 8, false, &[("", 5, 0)]);
        let btf = Btf::parse(&b.build()).expect("parses");
        assert!(matches!(
            btf.member_offset("s", &["x", "y"]),
            Err(BtfError::TooDeep(_))
        ));
        assert!(matches!(
            btf.member_offset("s", &["y"]),
            Err(BtfError::TooDeep(_))
        ));
        assert!(matches!(
            btf.member_offset("t", &["y"]),
            Err(BtfError::BadTypeId(99))
        ));
        assert!(matches!(
            btf.member_offset("r", &["y"]),
            Err(BtfError::TooDeep(5))
        ));
    }

    #[test]
    fn rejects_bad_headers() {
        let good = sample();
        let mut bad = good.clone();
        // The magic as a big-endian BTF stores it.
        bad[0] = 0xeb;
        bad[1] = 0x9f;
        assert!(matches!(Btf::parse(&bad), Err(BtfError::BadMagic(0x9feb))));
        let mut bad = good.clone();
        bad[2] = 2;
        assert!(matches!(
            Btf::parse(&bad),
            Err(BtfError::UnsupportedVersion(2))
        ));
        let mut bad = good.clone();
        bad[4] = 20;
        assert!(matches!(Btf::parse(&bad), Err(BtfError::BadHeader(_))));
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Btf::parse(&bad), Err(BtfError::Truncated { .. })));
        let mut bad = good.clone();
        bad[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Btf::parse(&bad), Err(BtfError::Truncated { .. })));
        let mut bad = good.clone();
        let strings_at =
            bad.len() - (u32::from_le_bytes([bad[20], bad[21], bad[22], bad[23]]) as usize);
        bad[strings_at] = b'x';
        assert!(matches!(Btf::parse(&bad), Err(BtfError::BadHeader(_))));
        let mut bad = good;
        // Kind 20 of the first type.
        bad[HEADER_LEN + 7] = 20;
        assert!(matches!(
            Btf::parse(&bad),
            Err(BtfError::UnknownKind { id: 1, kind: 20 })
        ));
    }

    #[test]
    fn every_truncation_of_sample_is_an_error() {
        let good = sample();
        assert!(Btf::parse(&good).is_ok());
        for len in 0..good.len() {
            assert!(Btf::parse(&good[..len]).is_err(), "length {len} parsed");
        }
    }

    /// xorshift64: deterministic pseudo-random bytes without a dependency.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed;
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    #[test]
    fn garbage_and_mutations_never_panic() {
        let mut next = rng(0x9e37_79b9_7f4a_7c15);
        for len in 0..512 {
            let garbage: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            assert!(Btf::parse(&garbage).is_err());
            // Valid header, garbage sections.
            let mut framed = sample()[..HEADER_LEN].to_vec();
            framed[8..24].copy_from_slice(&[0; 16]);
            framed[12..16].copy_from_slice(&(len as u32 / 2).to_le_bytes());
            framed[16..20].copy_from_slice(&(len as u32 / 2).to_le_bytes());
            framed[20..24].copy_from_slice(&(len as u32 - len as u32 / 2).to_le_bytes());
            framed.extend_from_slice(&garbage);
            exercise(&framed);
        }
        let good = sample();
        let mut parsed = 0;
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            parsed += usize::from(exercise(&bytes));
        }
        // Mutations that leave the data parseable must have been walked, not only rejected.
        assert!(parsed > 1000, "only {parsed} mutated inputs parsed");
    }

    /// Parses and, if that works, runs every lookup; returns whether it parsed.
    fn exercise(bytes: &[u8]) -> bool {
        let Ok(btf) = Btf::parse(bytes) else {
            return false;
        };
        let _ = resolve_offsets(&btf);
        for path in [
            &["common", "daddr"][..],
            &["flags", "byte"],
            &["legacy"],
            &["num"],
        ] {
            let _ = btf.member_offset("sock", path);
        }
        let _ = btf.struct_size("sock");
        let _ = btf.has_func("do_thing");
        true
    }

    fn vmlinux() -> Btf {
        Btf::from_file(VMLINUX_BTF)
            .expect("the project requires kernel BTF at /sys/kernel/btf/vmlinux")
    }

    #[test]
    fn resolves_all_offsets_on_this_kernel() {
        let btf = vmlinux();
        let o = resolve_offsets(&btf).expect("all offsets resolve");
        let common = btf.struct_size("sock_common").expect("sock_common");
        let sock = btf.struct_size("sock").expect("sock");
        assert_eq!(btf.member_offset("sock", &["__sk_common"]).ok(), Some(0));
        // sock_common's leading layout has been the same on every 64-bit kernel since 3.x.
        assert_eq!((o.sk_daddr, o.sk_rcv_saddr), (0, 4));
        assert_eq!((o.sk_dport, o.sk_num, o.sk_family), (12, 14, 16));
        assert_eq!(o.sk_daddr + 4, o.sk_rcv_saddr);
        assert_eq!(o.sk_dport + 2, o.sk_num);
        for (offset, size) in [
            (o.sk_family, 2),
            (o.sk_daddr, 4),
            (o.sk_rcv_saddr, 4),
            (o.sk_dport, 2),
            (o.sk_num, 2),
            (o.sk_v6_daddr, 16),
            (o.sk_v6_rcv_saddr, 16),
        ] {
            assert!(
                offset + size <= common,
                "{offset}+{size} outside sock_common ({common})"
            );
        }
        for offset in [o.sk_type, o.sk_protocol] {
            assert!(
                offset >= common && offset + 2 <= sock,
                "{offset} not in sock's own part"
            );
        }
        for (name, offset, size) in [
            ("task_struct", o.task_files, 8),
            ("files_struct", o.files_fdt, 8),
            ("fdtable", o.fdt_max_fds, 4),
            ("fdtable", o.fdt_fd, 8),
            ("file", o.file_inode, 8),
            ("file", o.file_private_data, 8),
            ("file", o.file_f_op, 8),
            ("inode", o.inode_mode, 2),
            ("socket", o.socket_sk, 8),
        ] {
            let total = btf.struct_size(name).expect(name);
            assert!(offset + size <= total, "{name}: {offset}+{size} > {total}");
        }
        // Pointers are 8-byte aligned on 64-bit kernels.
        for offset in [
            o.task_files,
            o.files_fdt,
            o.fdt_fd,
            o.file_inode,
            o.file_private_data,
            o.file_f_op,
            o.socket_sk,
        ] {
            assert_eq!(offset % 8, 0, "{o:?}");
        }
        assert_ne!(o.file_inode, o.file_private_data);
        assert_ne!(o.file_f_op, o.file_inode);
        assert_ne!(o.fdt_max_fds, o.fdt_fd);
        assert!(btf.has_func("tcp_sendmsg"));
        assert!(!btf.has_func("tracer_no_such_function"));
        let err = btf
            .member_offset("sock", &["__sk_common", "skc_nope"])
            .unwrap_err();
        assert!(err.to_string().contains("__sk_common.skc_nope"), "{err}");
    }

    #[test]
    fn truncated_vmlinux_is_an_error() {
        let bytes = std::fs::read(VMLINUX_BTF).expect("kernel BTF");
        let mut next = rng(42);
        let lengths = (0..64)
            .chain((0..100).map(|_| (next() % bytes.len() as u64) as usize))
            .chain([bytes.len() - 1]);
        for len in lengths {
            assert!(Btf::parse(&bytes[..len]).is_err(), "length {len} parsed");
        }
    }
}
