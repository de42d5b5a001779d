//! Go `crypto/tls` probes: recognises a Go program that uses `crypto/tls`, finds
//! `crypto/tls.(*Conn).Read` and `Write` in it, and attaches the kernel's Go TLS programs.
//!
//! Go moves goroutine stacks, which breaks uretprobes (the return address they plant on the stack
//! is copied to a new stack the kernel does not know about, and the program crashes). So Read's
//! return program is attached at every RET instruction of the function, found by decoding its
//! machine code; Write is emitted at entry and needs none. The functions are found in `.symtab`, or in `.gopclntab` (the table the Go runtime
//! itself uses for stack traces) when the program is stripped. The entry probe gets the layout of
//! the structs it walks from `tls.Conn` to the socket's fd as its BPF cookie, chosen by the Go
//! version recorded in `.go.buildinfo`.

use std::path::Path;

use aya::Ebpf;
use aya::programs::ProgramError;
use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope};
use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use tracer_ebpf::abi::GoTlsLayout;

use super::tls::{
    Elf, ElfError, SHT_SYMTAB, SYM_SIZE, Section, name_at, read_range, u32_at, u64_at, uprobe,
};

/// The probed functions: (symbol, entry program, program for its RET instructions).
const FUNCTIONS: [(&str, &str, Option<&str>); 2] = [
    (
        "crypto/tls.(*Conn).Read",
        "go_tls_read_enter",
        Some("go_tls_read_return"),
    ),
    ("crypto/tls.(*Conn).Write", "go_tls_write_enter", None),
];
/// Every Go TLS program, for loading.
pub(super) const PROGRAMS: [&str; 3] = [
    "go_tls_read_enter",
    "go_tls_read_return",
    "go_tls_write_enter",
];
/// The itab of `*net.TCPConn` as a `net.Conn` (`go:` since Go 1.22, `go.` before).
const TCP_CONN_ITABS: [&str; 2] = [
    "go:itab.*net.TCPConn,net.Conn",
    "go.itab.*net.TCPConn,net.Conn",
];
const EM_X86_64: u16 = 62;
/// Largest function decoded; the probed ones are a few KiB.
const MAX_FUNCTION_BYTES: u64 = 64 << 10;
const SHT_NOBITS: u32 = 8;
const BUILDINFO_MAGIC: &[u8] = b"\xff Go buildinf:";

/// Why a file is not probed as a Go TLS program.
#[derive(Debug, thiserror::Error)]
pub(super) enum GoError {
    /// The file could not be read.
    #[error(transparent)]
    Elf(#[from] ElfError),
    /// A Go program that uses crypto/tls, which the probes cannot handle (the reason, a metric
    /// label).
    #[error("unsupported Go program: {0}")]
    Unsupported(&'static str),
}

/// One function to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GoFunction {
    /// Its symbol.
    pub(super) name: &'static str,
    /// File offset of the entry.
    pub(super) entry: u64,
    /// File offsets of its RET instructions, when it has a return program.
    pub(super) returns: Vec<u64>,
    /// What the entry probe's cookie carries.
    pub(super) layout: GoTlsLayout,
}

/// A Go program to probe.
#[derive(Debug)]
pub(super) struct GoProgram {
    /// The Go version that built it (`go1.19.8`).
    pub(super) version: String,
    /// Where the functions were found: `symtab` or `pclntab`.
    pub(super) symbols: &'static str,
    pub(super) functions: Vec<GoFunction>,
}

/// A function's address and size, as a symbol table gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Symbol {
    addr: u64,
    size: u64,
}

/// The Go TLS functions of the program at `path`, or `None` when it is no Go program using
/// crypto/tls.
pub(super) fn go_tls_program(path: &Path) -> Result<Option<GoProgram>, GoError> {
    let elf = match Elf::open(path) {
        Ok(elf) => elf,
        Err(ElfError::NotElf) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    if !elf.executable {
        return Ok(None);
    }
    let Some(buildinfo) = elf.section_named(".go.buildinfo")? else {
        return Ok(None);
    };
    let (functions, itab, symbols) = match elf.sections.iter().find(|s| s.kind == SHT_SYMTAB) {
        Some(symtab) => {
            let (functions, itab) = symtab_lookup(&elf, symtab)?;
            (functions, itab, "symtab")
        }
        None => match elf.section_named(".gopclntab")? {
            Some(pclntab) => {
                let table = read_range(&elf.file, pclntab.offset, pclntab.size)?;
                let text = elf.section_named(".text")?.map_or(0, |t| t.addr);
                (pclntab_lookup(&table, text)?, None, "pclntab")
            }
            None => return Ok(None),
        },
    };
    let [Some(read), Some(write)] = functions else {
        // Not both: no crypto/tls in this program.
        return Ok(None);
    };
    if elf.machine != EM_X86_64 {
        return Err(GoError::Unsupported("architecture"));
    }
    let info = read_range(&elf.file, buildinfo.offset, buildinfo.size.min(4096))?;
    let version = go_version(&info, |addr, len| read_virtual(&elf, addr, len))?;
    let base = layout_for(&version)?;
    let mut out = Vec::with_capacity(2);
    for (&(name, _, ret), sym) in FUNCTIONS.iter().zip([read, write]) {
        let entry = file_offset(&elf, sym.addr)?;
        let mut returns = Vec::new();
        if ret.is_some() {
            let code = read_range(&elf.file, entry, sym.size.min(MAX_FUNCTION_BYTES))?;
            returns = ret_offsets(&code, sym.addr)?
                .into_iter()
                .map(|at| entry + at)
                .collect();
            if returns.is_empty() {
                return Err(GoError::Unsupported("no_return_instruction"));
            }
        }
        let itab_delta = itab
            .and_then(|itab| i32::try_from(i128::from(itab) - i128::from(sym.addr)).ok())
            .unwrap_or(0);
        out.push(GoFunction {
            name,
            entry,
            returns,
            layout: GoTlsLayout { itab_delta, ..base },
        });
    }
    Ok(Some(GoProgram {
        version,
        symbols,
        functions: out,
    }))
}

/// Read, Write and the TCPConn itab address from a symbol table.
fn symtab_lookup(
    elf: &Elf,
    symtab: &Section,
) -> Result<([Option<Symbol>; 2], Option<u64>), ElfError> {
    if symtab.entsize != SYM_SIZE {
        return Err(ElfError::Malformed("symbol size"));
    }
    let strtab = elf.section(symtab.link)?;
    let names = read_range(&elf.file, strtab.offset, strtab.size)?;
    let symbols = read_range(&elf.file, symtab.offset, symtab.size)?;
    let mut functions = [None; 2];
    let mut itab = None;
    for sym in symbols.chunks_exact(SYM_SIZE as usize) {
        let Some(name) = u32_at(sym, 0).and_then(|at| name_at(&names, at)) else {
            continue;
        };
        let (Some(addr), Some(size)) = (u64_at(sym, 8), u64_at(sym, 16)) else {
            continue;
        };
        if let Some(i) = FUNCTIONS.iter().position(|f| f.0.as_bytes() == name) {
            functions[i] = Some(Symbol { addr, size });
        } else if TCP_CONN_ITABS.iter().any(|n| n.as_bytes() == name) {
            itab = Some(addr);
        }
    }
    Ok((functions, itab))
}

/// Read and Write from the runtime's function table (Go 1.18 and later: stripped programs keep
/// it). A function ends where the next one starts. `text` is the address of `.text`, for tables
/// whose text start is left to a relocation.
fn pclntab_lookup(table: &[u8], text: u64) -> Result<[Option<Symbol>; 2], GoError> {
    let bad = || GoError::Elf(ElfError::Malformed("gopclntab"));
    let magic = u32_at(table, 0).ok_or_else(bad)?;
    if magic != 0xffff_fff0 && magic != 0xffff_fff1 {
        // Go 1.17 and older tables.
        return Err(GoError::Unsupported("stripped_pclntab_version"));
    }
    if table.get(7) != Some(&8) {
        return Err(bad());
    }
    let word = |i: usize| u64_at(table, 8 + 8 * i).ok_or_else(bad);
    let nfunc = usize::try_from(word(0)?).map_err(|_| bad())?;
    let text_start = match word(2)? {
        0 => text,
        start => start,
    };
    let funcnames = usize::try_from(word(3)?).map_err(|_| bad())?;
    let functab = usize::try_from(word(7)?).map_err(|_| bad())?;
    let mut found = [None; 2];
    for i in 0..nfunc {
        let at = functab.checked_add(8 * i).ok_or_else(bad)?;
        let field = |at: usize, plus: usize| at.checked_add(plus).and_then(|a| u32_at(table, a));
        let entry = field(at, 0).ok_or_else(bad)?;
        let func = field(at, 4).ok_or_else(bad)? as usize;
        let name_off = functab
            .checked_add(func)
            .and_then(|f| field(f, 4))
            .ok_or_else(bad)?;
        let Some(name) = funcnames
            .checked_add(name_off as usize)
            .and_then(|at| name_at(table, u32::try_from(at).ok()?))
        else {
            return Err(bad());
        };
        let Some(slot) = FUNCTIONS.iter().position(|f| f.0.as_bytes() == name) else {
            continue;
        };
        let next = field(at, 8).ok_or_else(bad)?;
        found[slot] = Some(Symbol {
            addr: text_start.checked_add(u64::from(entry)).ok_or_else(bad)?,
            size: u64::from(next.checked_sub(entry).ok_or_else(bad)?),
        });
    }
    Ok(found)
}

/// The file offset of virtual address `addr`.
fn file_offset(elf: &Elf, addr: u64) -> Result<u64, ElfError> {
    elf.sections
        .iter()
        .find(|s| s.kind != SHT_NOBITS && s.addr != 0 && addr >= s.addr && addr - s.addr < s.size)
        .map(|s| s.offset + (addr - s.addr))
        .ok_or(ElfError::Malformed("address outside the sections"))
}

/// `len` bytes at virtual address `addr`.
fn read_virtual(elf: &Elf, addr: u64, len: u64) -> Result<Vec<u8>, ElfError> {
    read_range(&elf.file, file_offset(elf, addr)?, len)
}

/// The Go version in the `.go.buildinfo` section `info` (its first bytes). `read` reads memory by
/// virtual address, for the pointer format Go used before 1.18.
fn go_version(
    info: &[u8],
    read: impl Fn(u64, u64) -> Result<Vec<u8>, ElfError>,
) -> Result<String, GoError> {
    let bad = || GoError::Elf(ElfError::Malformed("go.buildinfo"));
    if !info.starts_with(BUILDINFO_MAGIC) || info.len() < 32 {
        return Err(bad());
    }
    let (ptr_size, flags) = (info[14], info[15]);
    let version = if flags & 2 != 0 {
        // Go 1.18 and later: length-prefixed strings inline.
        let (len, used) = uvarint(&info[32..]).ok_or_else(bad)?;
        let start = 32 + used;
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| start.checked_add(len))
            .ok_or_else(bad)?;
        info.get(start..end).ok_or_else(bad)?.to_vec()
    } else {
        // Before: a pointer to a string header (data pointer, length).
        if ptr_size != 8 || flags & 1 != 0 {
            return Err(GoError::Unsupported("buildinfo_format"));
        }
        let header = read(u64_at(info, 16).ok_or_else(bad)?, 16)?;
        let (data, len) = (
            u64_at(&header, 0).ok_or_else(bad)?,
            u64_at(&header, 8).ok_or_else(bad)?,
        );
        if len > 256 {
            return Err(bad());
        }
        read(data, len)?
    };
    String::from_utf8(version).map_err(|_| bad())
}

/// A Go unsigned varint and the bytes it took.
fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// (major, minor) of a Go version string such as `go1.19.8`, `go1.21rc2` or
/// `devel go1.23-abcdef`.
fn go_release(version: &str) -> Option<(u32, u32)> {
    let at = version.find("go1.")?;
    let rest = &version[at + 2..];
    let (major, rest) = rest.split_once('.')?;
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    Some((major.parse().ok()?, rest[..digits].parse().ok()?))
}

/// The struct layout the probes walk, for a program built by Go `version`. Go 1.17 brought the
/// register ABI the probes read arguments from. The members followed (`tls.Conn.conn`,
/// `net.TCPConn.conn.fd`, `netFD.pfd`, `poll.FD.Sysfd` after the 16-byte `fdMutex`) have kept
/// their places since; measured with reflect on Go 1.19.
fn layout_for(version: &str) -> Result<GoTlsLayout, GoError> {
    match go_release(version) {
        Some((1, minor)) if minor >= 17 => Ok(GoTlsLayout {
            conn: 0,
            tcp_conn_fd: 0,
            netfd_sysfd: 16,
            itab_delta: 0,
        }),
        Some(_) => Err(GoError::Unsupported("go_version")),
        None => Err(GoError::Unsupported("go_version_unknown")),
    }
}

/// Offsets (from the start of `code`, which is loaded at `addr`) of its RET instructions.
fn ret_offsets(code: &[u8], addr: u64) -> Result<Vec<u64>, GoError> {
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let at = decoder.position() as u64;
        let instr = decoder.decode();
        if instr.is_invalid() {
            return Err(GoError::Unsupported("undecodable_instruction"));
        }
        if instr.mnemonic() == Mnemonic::Ret {
            out.push(at);
        }
    }
    Ok(out)
}

/// Attaches the entry program at each function's start and its return program, if any, at each
/// RET; on failure nothing stays attached.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    path: &Path,
    program: &GoProgram,
) -> Result<Vec<UProbeLink>, ProgramError> {
    let mut links = Vec::new();
    for f in &program.functions {
        let Some(&(_, enter, ret)) = FUNCTIONS.iter().find(|(n, ..)| *n == f.name) else {
            continue;
        };
        let point = UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(f.entry),
            cookie: Some(f.layout.cookie()),
        };
        let p = uprobe(ebpf, enter)?;
        let id = p.attach(point, path, UProbeScope::AllProcesses)?;
        // Dropping `links` on an early return detaches what was attached so far.
        links.push(p.take_link(id)?);
        let Some(ret) = ret else { continue };
        let p = uprobe(ebpf, ret)?;
        for &at in &f.returns {
            let id = p.attach(
                UProbeAttachLocation::AbsoluteOffset(at),
                path,
                UProbeScope::AllProcesses,
            )?;
            links.push(p.take_link(id)?);
        }
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_round_trips_the_layout() {
        for layout in [
            GoTlsLayout {
                conn: 0,
                tcp_conn_fd: 0,
                netfd_sysfd: 16,
                itab_delta: 0,
            },
            GoTlsLayout {
                conn: 0x1234,
                tcp_conn_fd: 8,
                netfd_sysfd: 24,
                itab_delta: -0x1b_0000,
            },
            GoTlsLayout {
                conn: u16::MAX,
                tcp_conn_fd: u8::MAX,
                netfd_sysfd: u8::MAX,
                itab_delta: i32::MAX,
            },
        ] {
            assert_eq!(GoTlsLayout::from_cookie(layout.cookie()), layout);
        }
    }

    #[test]
    fn go_release_reads_released_and_development_versions() {
        assert_eq!(go_release("go1.19.8"), Some((1, 19)));
        assert_eq!(go_release("go1.17"), Some((1, 17)));
        assert_eq!(go_release("go1.21rc2"), Some((1, 21)));
        assert_eq!(go_release("devel go1.23-4f7bcd3 Tue"), Some((1, 23)));
        assert_eq!(go_release("gccgo"), None);
        assert!(layout_for("go1.16.15").is_err());
        assert_eq!(layout_for("go1.17.1").expect("1.17").netfd_sysfd, 16);
    }

    /// The `.go.buildinfo` header: magic, pointer size, flags.
    fn buildinfo_header(flags: u8) -> Vec<u8> {
        let mut b = BUILDINFO_MAGIC.to_vec();
        b.extend_from_slice(&[8, flags]);
        b.resize(32, 0);
        b
    }

    #[test]
    fn version_from_inline_buildinfo() {
        // As Go 1.19.8 writes it (copied from a real binary's section).
        let mut info = buildinfo_header(2);
        info.push(8);
        info.extend_from_slice(b"go1.19.8");
        info.extend_from_slice(&[0xd0, 0x02, b'0']);
        let version = go_version(&info, |_, _| panic!("no pointers")).expect("parses");
        assert_eq!(version, "go1.19.8");
    }

    #[test]
    fn version_from_pointer_buildinfo() {
        let mut info = buildinfo_header(0);
        info[16..24].copy_from_slice(&0x50_0000u64.to_le_bytes());
        let read = |addr: u64, len: u64| -> Result<Vec<u8>, ElfError> {
            match (addr, len) {
                (0x50_0000, 16) => {
                    let mut h = 0x60_0000u64.to_le_bytes().to_vec();
                    h.extend_from_slice(&8u64.to_le_bytes());
                    Ok(h)
                }
                (0x60_0000, 8) => Ok(b"go1.17.2".to_vec()),
                _ => Err(ElfError::Malformed("test address")),
            }
        };
        assert_eq!(go_version(&info, read).expect("parses"), "go1.17.2");
    }

    #[test]
    fn malformed_buildinfo_is_an_error_not_a_panic() {
        let full = {
            let mut info = buildinfo_header(2);
            info.push(8);
            info.extend_from_slice(b"go1.19.8");
            info
        };
        for cut in [0, 10, 31, 32, 33, 36] {
            let res = go_version(&full[..cut], |_, _| Err(ElfError::Malformed("none")));
            assert!(res.is_err(), "cut at {cut}: {res:?}");
        }
        let mut huge = buildinfo_header(2);
        huge.extend_from_slice(&[0xff; 11]);
        assert!(go_version(&huge, |_, _| Err(ElfError::Malformed("none"))).is_err());
    }

    #[test]
    fn finds_every_ret_and_only_rets() {
        // The tail of crypto/tls.(*Conn).Read as Go 1.19.8 compiles it, then code whose
        // immediates and displacements hold 0xc3 bytes that are no RET.
        let code: &[u8] = &[
            0x48, 0x8b, 0x44, 0x24, 0x20, // mov rax,[rsp+0x20]
            0x48, 0x8b, 0x5c, 0x24, 0x38, // mov rbx,[rsp+0x38]
            0x48, 0x83, 0xc4, 0x68, // add rsp,0x68
            0xc3, // ret                                  <- 14
            0xe8, 0x2d, 0x09, 0xe9, 0xff, // call runtime.deferreturn
            0x48, 0x8b, 0x6c, 0x24, 0x60, // mov rbp,[rsp+0x60]
            0xc3, // ret                                  <- 25
            0xb8, 0xc3, 0xc3, 0xc3, 0xc3, // mov eax,0xc3c3c3c3
            0x48, 0x8b, 0x83, 0xc3, 0x00, 0x00, 0x00, // mov rax,[rbx+0xc3]
            0x0f, 0x11, 0x7c, 0x24, 0x38, // movups [rsp+0x38],xmm7
            0xc2, 0x08, 0x00, // ret 8                    <- 43
            0xcc, 0xcc, 0xcc, // int3 padding
        ];
        assert_eq!(
            ret_offsets(code, 0x5a_3200).expect("decodes"),
            vec![14, 25, 43]
        );
    }

    #[test]
    fn a_truncated_instruction_is_unsupported() {
        let res = ret_offsets(&[0xc3, 0x48, 0x8b], 0x1000);
        assert!(matches!(res, Err(GoError::Unsupported(_))), "{res:?}");
    }

    /// A Go 1.18+ function table with `names` (in address order, 0x40 bytes apart from 0x100).
    fn pclntab(names: &[&str], text_start: u64) -> Vec<u8> {
        let header = 8 + 8 * 8;
        let mut nametab = Vec::new();
        let mut name_offs = Vec::new();
        for n in names {
            name_offs.push(u32::try_from(nametab.len()).expect("small"));
            nametab.extend_from_slice(n.as_bytes());
            nametab.push(0);
        }
        let funcnames = header;
        let functab = funcnames + nametab.len();
        let nfunc = names.len();
        // Entries, the end sentinel, then one 8-byte _func per function.
        let funcs_at = 8 * (nfunc + 1);
        let mut tab = Vec::new();
        for i in 0..=nfunc {
            let entry = 0x100 + 0x40 * u32::try_from(i).expect("small");
            let func = u32::try_from(funcs_at + 8 * i.min(nfunc - 1)).expect("small");
            tab.extend_from_slice(&entry.to_le_bytes());
            tab.extend_from_slice(&func.to_le_bytes());
        }
        for (i, off) in name_offs.iter().enumerate() {
            let entry = 0x100 + 0x40 * u32::try_from(i).expect("small");
            tab.extend_from_slice(&entry.to_le_bytes());
            tab.extend_from_slice(&off.to_le_bytes());
        }
        let mut t = Vec::new();
        t.extend_from_slice(&0xffff_fff1u32.to_le_bytes());
        t.extend_from_slice(&[0, 0, 1, 8]);
        let words = [
            nfunc as u64,
            0,
            text_start,
            funcnames as u64,
            0,
            0,
            0,
            functab as u64,
        ];
        for w in words {
            t.extend_from_slice(&w.to_le_bytes());
        }
        t.extend_from_slice(&nametab);
        t.extend_from_slice(&tab);
        t
    }

    #[test]
    fn pclntab_gives_addresses_and_sizes() {
        let names = [
            "main.main",
            "crypto/tls.(*Conn).Write",
            "crypto/tls.(*Conn).Read",
            "crypto/tls.(*Conn).ReadFrom",
        ];
        let got = pclntab_lookup(&pclntab(&names, 0x40_1000), 0).expect("parses");
        assert_eq!(
            got,
            [
                Some(Symbol {
                    addr: 0x40_1000 + 0x180,
                    size: 0x40
                }),
                Some(Symbol {
                    addr: 0x40_1000 + 0x140,
                    size: 0x40
                }),
            ]
        );
        // A text start left to a relocation: the .text address stands in.
        let got = pclntab_lookup(&pclntab(&names, 0), 0x1000).expect("parses");
        assert_eq!(got[0].map(|s| s.addr), Some(0x1180));
    }

    #[test]
    fn truncated_pclntab_is_an_error_not_a_panic() {
        let full = pclntab(&["crypto/tls.(*Conn).Read", "main.main"], 0x40_1000);
        for cut in [0, 4, 8, 40, 72, 80, full.len() - 9, full.len() - 1] {
            let res = pclntab_lookup(&full[..cut], 0);
            assert!(res.is_err(), "cut at {cut}: {res:?}");
        }
        let mut old = full.clone();
        old[..4].copy_from_slice(&0xffff_fffau32.to_le_bytes());
        assert!(matches!(
            pclntab_lookup(&old, 0),
            Err(GoError::Unsupported(_))
        ));
    }
}
