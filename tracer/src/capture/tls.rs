//! TLS library discovery: finds every mapped file that defines `SSL_read` and `SSL_write` (libssl,
//! or an executable with OpenSSL/BoringSSL linked in, such as node) in the processes of the host,
//! and attaches the kernel's SSL uprobes to each file once. Go programs, whose `crypto/tls` is no
//! SSL library, are recognised among the same files and probed by [`super::gotls`].
//!
//! Files are told apart by the (device, inode) their mapping shows, so one library shared by many
//! processes, or seen through several mount namespaces, is probed once. A process in another mount
//! namespace is reached through `/proc/<pid>/root`. New processes are looked at on every scan,
//! young ones again for a while (a library loaded with dlopen after start, as python's `ssl`
//! module does), and all of them now and then.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::programs::uprobe::{UProbeAttachLocation, UProbeLink, UProbeScope};
use aya::programs::{ProgramError, UProbe};
use thiserror::Error;
use tracing::{debug, info, warn};

use super::gotls::{self, GoError};
use crate::metrics;

/// The SSL functions probed: name, entry program, and whether [`RETURN_PROGRAM`] is attached too.
const FUNCTIONS: [(&str, &str, bool); 6] = [
    ("SSL_read", "ssl_read_enter", true),
    ("SSL_read_ex", "ssl_read_ex_enter", true),
    ("SSL_write", "ssl_write_enter", true),
    ("SSL_write_ex", "ssl_write_ex_enter", true),
    // Moves no plaintext; tells which socket the SSL object uses (optional).
    ("SSL_do_handshake", "ssl_handshake_enter", true),
    // Forgets the object's socket: the next SSL object at the same address is another
    // connection's (optional).
    ("SSL_free", "ssl_free_enter", false),
];
/// The return program shared by the read, write and handshake [`FUNCTIONS`].
const RETURN_PROGRAM: &str = "ssl_return";
/// A file is an SSL library only when it defines both of these.
const REQUIRED: [&str; 2] = ["SSL_read", "SSL_write"];
/// Processes first seen less than this long ago are looked at on every scan.
const YOUNG: Duration = Duration::from_secs(10);
/// Every process is looked at again this often.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(30);
/// Files remembered as examined; past this the negative results are forgotten.
const MAX_EXAMINED: usize = 65536;
/// Largest table (hash table, string table, symbol table) read whole from a file.
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Largest `.symtab` plus `.strtab` searched symbol by symbol; bigger ones are left out.
const MAX_SYMTAB_BYTES: u64 = 32 << 20;

/// Why a file's symbols could not be read.
#[derive(Debug, Error)]
pub(super) enum ElfError {
    /// Reading the file failed.
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    /// Not a 64-bit little-endian ELF file.
    #[error("not a 64-bit little-endian ELF file")]
    NotElf,
    /// A header or table points outside the file or is inconsistent.
    #[error("malformed ELF: {0}")]
    Malformed(&'static str),
}

/// A section header, the fields used here.
#[derive(Debug, Clone, Copy)]
pub(super) struct Section {
    /// Offset of the name in the section name table.
    pub(super) name: u32,
    pub(super) kind: u32,
    pub(super) addr: u64,
    pub(super) offset: u64,
    pub(super) size: u64,
    pub(super) link: u32,
    pub(super) entsize: u64,
}

pub(super) const SHT_SYMTAB: u32 = 2;
const SHT_HASH: u32 = 5;
const SHT_DYNSYM: u32 = 11;
const SHT_GNU_HASH: u32 = 0x6fff_fff6;
const ET_EXEC: u16 = 2;
const PT_INTERP: u32 = 3;
const STT_FUNC: u8 = 2;
const SHN_UNDEF: u16 = 0;
const SHN_LORESERVE: u16 = 0xff00;
pub(super) const SYM_SIZE: u64 = 24;
const SHDR_SIZE: u64 = 64;

pub(super) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub(super) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

pub(super) fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Reads `len` bytes at `offset`, refusing tables larger than [`MAX_TABLE_BYTES`].
pub(super) fn read_range(file: &File, offset: u64, len: u64) -> Result<Vec<u8>, ElfError> {
    if len > MAX_TABLE_BYTES {
        return Err(ElfError::Malformed("table too large"));
    }
    let mut buf = vec![0u8; usize::try_from(len).map_err(|_| ElfError::Malformed("size"))?];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// The parts of an ELF file that symbol lookup needs.
pub(super) struct Elf {
    pub(super) file: File,
    pub(super) sections: Vec<Section>,
    /// A program (`ET_EXEC`, or `ET_DYN` with an interpreter), not a shared library.
    pub(super) executable: bool,
    /// `e_machine`.
    pub(super) machine: u16,
    /// Index of the section name table.
    shstrndx: u16,
}

impl Elf {
    pub(super) fn open(path: &Path) -> Result<Elf, ElfError> {
        let file = File::open(path)?;
        let mut ehdr = [0u8; 64];
        match file.read_exact_at(&mut ehdr, 0) {
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ElfError::NotElf);
            }
            other => other?,
        }
        if ehdr[..4] != *b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
            return Err(ElfError::NotElf);
        }
        let bad = || ElfError::Malformed("ELF header");
        let kind = u16_at(&ehdr, 0x10).ok_or_else(bad)?;
        let executable = kind == ET_EXEC || has_interpreter(&file, &ehdr)?;
        let machine = u16_at(&ehdr, 0x12).ok_or_else(bad)?;
        let shstrndx = u16_at(&ehdr, 0x3e).ok_or_else(bad)?;
        let sections = section_headers(&file, &ehdr)?;
        Ok(Elf {
            file,
            sections,
            executable,
            machine,
            shstrndx,
        })
    }

    /// The first section called `name`.
    pub(super) fn section_named(&self, name: &str) -> Result<Option<Section>, ElfError> {
        let Some(names) = self.sections.get(usize::from(self.shstrndx)) else {
            return Ok(None);
        };
        let names = read_range(&self.file, names.offset, names.size)?;
        Ok(self
            .sections
            .iter()
            .find(|s| name_at(&names, s.name) == Some(name.as_bytes()))
            .copied())
    }

    pub(super) fn section(&self, index: u32) -> Result<&Section, ElfError> {
        self.sections
            .get(index as usize)
            .ok_or(ElfError::Malformed("section index"))
    }

    /// The file offset of the function that symbol `index` of `symtab` defines under `name`.
    fn defined(&self, symtab: &Section, index: u64, name: &[u8]) -> Result<Option<u64>, ElfError> {
        let at = index
            .checked_mul(SYM_SIZE)
            .filter(|&off| off.saturating_add(SYM_SIZE) <= symtab.size)
            .ok_or(ElfError::Malformed("symbol index"))?;
        let sym = read_range(&self.file, symtab.offset.saturating_add(at), SYM_SIZE)?;
        let strtab = self.section(symtab.link)?;
        let name_off = u64::from(u32_at(&sym, 0).ok_or(ElfError::Malformed("symbol"))?);
        let len = (name.len() as u64 + 1).min(strtab.size.saturating_sub(name_off));
        let stored = read_range(&self.file, strtab.offset.saturating_add(name_off), len)?;
        if stored.strip_suffix(&[0]) != Some(name) {
            return Ok(None);
        }
        Ok(self.function_offset(&sym))
    }

    /// The file offset of the function a symbol entry defines (`None`: not a defined function).
    fn function_offset(&self, sym: &[u8]) -> Option<u64> {
        let info = *sym.get(4)?;
        let shndx = u16_at(sym, 6)?;
        let value = u64_at(sym, 8)?;
        if info & 0xf != STT_FUNC || shndx == SHN_UNDEF || shndx >= SHN_LORESERVE {
            return None;
        }
        let section = self.sections.get(usize::from(shndx))?;
        // The kernel wants a file offset; a symbol's value is its virtual address.
        value
            .checked_sub(section.addr)
            .and_then(|rel| rel.checked_add(section.offset))
    }

    /// Looks `wanted` names up through a GNU or SysV hash table of the dynamic symbols.
    fn lookup_hashed(
        &self,
        hash: &Section,
        wanted: &[&'static str],
        found: &mut HashMap<&'static str, u64>,
    ) -> Result<(), ElfError> {
        let symtab = *self.section(hash.link)?;
        let table = read_range(&self.file, hash.offset, hash.size)?;
        let max_steps = symtab.size / SYM_SIZE;
        let bad = || ElfError::Malformed("hash table");
        for &name in wanted {
            if found.contains_key(name) {
                continue;
            }
            let name_bytes = name.as_bytes();
            if hash.kind == SHT_GNU_HASH {
                let nbuckets = u32_at(&table, 0).ok_or_else(bad)?;
                let symoffset = u32_at(&table, 4).ok_or_else(bad)?;
                let bloom_words = u32_at(&table, 8).ok_or_else(bad)? as usize;
                if nbuckets == 0 {
                    continue;
                }
                let h = gnu_hash(name_bytes);
                let buckets = 16 + 8 * bloom_words;
                let chains = buckets + 4 * nbuckets as usize;
                let bucket = buckets + 4 * (h % nbuckets) as usize;
                let mut index = u32_at(&table, bucket).ok_or_else(bad)?;
                if index < symoffset {
                    continue;
                }
                for _ in 0..max_steps {
                    let slot = chains + 4 * (index - symoffset) as usize;
                    let chain = u32_at(&table, slot).ok_or_else(bad)?;
                    if chain | 1 == h | 1
                        && let Some(off) = self.defined(&symtab, u64::from(index), name_bytes)?
                    {
                        found.insert(name, off);
                        break;
                    }
                    if chain & 1 != 0 {
                        break;
                    }
                    index = index.checked_add(1).ok_or_else(bad)?;
                }
            } else {
                let nbucket = u32_at(&table, 0).ok_or_else(bad)?;
                if nbucket == 0 {
                    continue;
                }
                let chains = 8 + 4 * nbucket as usize;
                let bucket = 8 + 4 * (sysv_hash(name_bytes) % nbucket) as usize;
                let mut index = u32_at(&table, bucket).ok_or_else(bad)?;
                for _ in 0..max_steps {
                    if index == 0 {
                        break;
                    }
                    if let Some(off) = self.defined(&symtab, u64::from(index), name_bytes)? {
                        found.insert(name, off);
                        break;
                    }
                    index = u32_at(&table, chains + 4 * index as usize).ok_or_else(bad)?;
                }
            }
        }
        Ok(())
    }

    /// Looks `wanted` names up by reading the whole symbol table `symtab`.
    fn lookup_scan(
        &self,
        symtab: &Section,
        wanted: &[&'static str],
        found: &mut HashMap<&'static str, u64>,
    ) -> Result<(), ElfError> {
        if symtab.entsize != SYM_SIZE {
            return Err(ElfError::Malformed("symbol size"));
        }
        let strtab = self.section(symtab.link)?;
        let names = read_range(&self.file, strtab.offset, strtab.size)?;
        let symbols = read_range(&self.file, symtab.offset, symtab.size)?;
        for sym in symbols.chunks_exact(SYM_SIZE as usize) {
            let Some(name) = u32_at(sym, 0).and_then(|at| name_at(&names, at)) else {
                continue;
            };
            let Some(&want) = wanted.iter().find(|w| w.as_bytes() == name) else {
                continue;
            };
            if !found.contains_key(want)
                && let Some(off) = self.function_offset(sym)
            {
                found.insert(want, off);
            }
        }
        Ok(())
    }
}

/// Whether the program headers name an interpreter (a position-independent executable).
fn has_interpreter(file: &File, ehdr: &[u8]) -> Result<bool, ElfError> {
    let bad = || ElfError::Malformed("program header table");
    let phoff = u64_at(ehdr, 0x20).ok_or_else(bad)?;
    let phentsize = u64::from(u16_at(ehdr, 0x36).ok_or_else(bad)?);
    let phnum = u64::from(u16_at(ehdr, 0x38).ok_or_else(bad)?);
    if phoff == 0 || phnum == 0 {
        return Ok(false);
    }
    if phentsize < 4 {
        return Err(bad());
    }
    let table = read_range(file, phoff, phentsize * phnum)?;
    Ok(table
        .chunks_exact(phentsize as usize)
        .any(|ph| u32_at(ph, 0) == Some(PT_INTERP)))
}

fn section_headers(file: &File, ehdr: &[u8]) -> Result<Vec<Section>, ElfError> {
    let bad = || ElfError::Malformed("ELF header");
    let shoff = u64_at(ehdr, 0x28).ok_or_else(bad)?;
    let shentsize = u16_at(ehdr, 0x3a).ok_or_else(bad)?;
    let mut shnum = u64::from(u16_at(ehdr, 0x3c).ok_or_else(bad)?);
    if shoff == 0 {
        return Ok(Vec::new());
    }
    if u64::from(shentsize) != SHDR_SIZE {
        return Err(ElfError::Malformed("section header size"));
    }
    if shnum == 0 {
        // Extended numbering: the real count is section 0's size field.
        let first = read_range(file, shoff, SHDR_SIZE)?;
        shnum = u64_at(&first, 32).ok_or(ElfError::Malformed("section 0"))?;
    }
    let table = read_range(
        file,
        shoff,
        shnum
            .checked_mul(SHDR_SIZE)
            .ok_or(ElfError::Malformed("section count"))?,
    )?;
    table
        .chunks_exact(SHDR_SIZE as usize)
        .map(|h| {
            Some(Section {
                name: u32_at(h, 0)?,
                kind: u32_at(h, 4)?,
                addr: u64_at(h, 16)?,
                offset: u64_at(h, 24)?,
                size: u64_at(h, 32)?,
                link: u32_at(h, 40)?,
                entsize: u64_at(h, 56)?,
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or(ElfError::Malformed("section header"))
}

/// The GNU symbol hash (DJB's).
fn gnu_hash(name: &[u8]) -> u32 {
    name.iter().fold(5381u32, |h, &c| {
        h.wrapping_mul(33).wrapping_add(u32::from(c))
    })
}

/// The System V ELF symbol hash.
fn sysv_hash(name: &[u8]) -> u32 {
    name.iter().fold(0u32, |h, &c| {
        let h = (h << 4).wrapping_add(u32::from(c));
        let g = h & 0xf000_0000;
        (h ^ (g >> 24)) & !g
    })
}

/// The NUL-terminated name at `at` in a string table.
pub(super) fn name_at(strtab: &[u8], at: u32) -> Option<&[u8]> {
    let rest = strtab.get(usize::try_from(at).ok()?..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    Some(&rest[..end])
}

/// File offsets of the SSL [`FUNCTIONS`] that the ELF file at `path` defines. Dynamic symbols are
/// looked up through their hash table (a few reads, whatever the library's size); a program's own
/// `.symtab` (OpenSSL linked in without exporting it) is searched only when the dynamic symbols
/// lack them and it is at most [`MAX_SYMTAB_BYTES`]. Empty when the file is not an SSL library.
fn ssl_functions(path: &Path) -> Result<Vec<(&'static str, u64)>, ElfError> {
    let elf = Elf::open(path)?;
    let wanted: Vec<&'static str> = FUNCTIONS.iter().map(|(name, ..)| *name).collect();
    let mut found = HashMap::new();
    let hashes: Vec<Section> = elf
        .sections
        .iter()
        .filter(|s| s.kind == SHT_GNU_HASH || s.kind == SHT_HASH)
        .copied()
        .collect();
    // One hash table suffices; GNU's comes first when both exist.
    if let Some(hash) = hashes
        .iter()
        .find(|s| s.kind == SHT_GNU_HASH)
        .or(hashes.first())
    {
        elf.lookup_hashed(hash, &wanted, &mut found)?;
    } else {
        for dynsym in elf.sections.iter().filter(|s| s.kind == SHT_DYNSYM) {
            elf.lookup_scan(dynsym, &wanted, &mut found)?;
        }
    }
    if elf.executable && !REQUIRED.iter().all(|r| found.contains_key(r)) {
        for symtab in elf.sections.iter().filter(|s| s.kind == SHT_SYMTAB) {
            let names = elf.section(symtab.link)?.size;
            if symtab.size.saturating_add(names) <= MAX_SYMTAB_BYTES {
                elf.lookup_scan(symtab, &wanted, &mut found)?;
            }
        }
    }
    if !REQUIRED.iter().all(|r| found.contains_key(r)) {
        return Ok(Vec::new());
    }
    Ok(FUNCTIONS
        .iter()
        .filter_map(|(name, ..)| found.get(name).map(|&off| (*name, off)))
        .collect())
}

/// An executable file mapping of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    /// Device of the mapped file, `major << 32 | minor`.
    dev: u64,
    /// Inode of the mapped file.
    inode: u64,
    /// Path in the process's mount namespace.
    path: String,
}

/// The executable file mappings in the text of a `/proc/<pid>/maps`, each file once. Anonymous,
/// special and deleted mappings are left out.
fn exec_mappings(maps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in maps.lines() {
        let mut fields = line.splitn(6, ' ');
        let (Some(_range), Some(perms), Some(_offset), Some(dev), Some(inode), Some(path)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let path = path.trim_start();
        if !perms.contains('x') || !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        let Some((major, minor)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor), Ok(inode)) = (
            u64::from_str_radix(major, 16),
            u64::from_str_radix(minor, 16),
            inode.parse::<u64>(),
        ) else {
            continue;
        };
        if inode == 0 {
            continue;
        }
        let m = Mapping {
            dev: major << 32 | minor,
            inode,
            path: path.to_owned(),
        };
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

/// What became of a file once examined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Examined {
    /// Not an SSL library (or unreadable; counted when it happened).
    Skip,
    /// Probes attached.
    Attached,
}

/// The SSL probes attached so far and what is known about the processes and files of the host.
pub struct TlsProbes {
    proc_root: PathBuf,
    /// When non-empty, only these processes are looked at.
    only: HashSet<u32>,
    own_pid: u32,
    /// Files examined, by (device, inode).
    examined: HashMap<(u64, u64), Examined>,
    /// Processes seen, with when they were first seen.
    processes: HashMap<u32, Instant>,
    last_full: Option<Instant>,
    /// Attached probes; dropping one detaches it. Each detach waits for an RCU grace period in the
    /// kernel (about 0.1 s here), one after another, so stopping takes longer the more there are.
    links: Vec<UProbeLink>,
}

impl TlsProbes {
    /// Discovery over `proc_root` (normally `/proc`); `only` restricts it to these processes.
    pub fn new(proc_root: impl Into<PathBuf>, only: &[u32]) -> Self {
        TlsProbes {
            proc_root: proc_root.into(),
            only: only.iter().copied().collect(),
            own_pid: std::process::id(),
            examined: HashMap::new(),
            processes: HashMap::new(),
            last_full: None,
            links: Vec::new(),
        }
    }

    /// Number of probes attached.
    pub fn attached(&self) -> usize {
        self.links.len()
    }

    /// Looks at new and young processes (all of them when a full scan is due) and attaches the
    /// probes of the `ebpf` object to every SSL library not probed yet.
    pub fn scan(&mut self, ebpf: &mut Ebpf) {
        let now = Instant::now();
        // Processes running at the first scan are not young: dlopen in them waits for a full scan.
        let first_seen = match self.last_full {
            None => now.checked_sub(YOUNG).unwrap_or(now),
            Some(_) => now,
        };
        let full = self
            .last_full
            .is_none_or(|t| now.duration_since(t) >= FULL_SCAN_EVERY);
        if full {
            self.last_full = Some(now);
        }
        let pids = match self.pids() {
            Ok(pids) => pids,
            Err(err) => {
                metrics::add(
                    "tls_scan_errors_total",
                    metrics::labels(&[("reason", "proc_unreadable")]),
                    1,
                );
                debug!(%err, "cannot list processes");
                return;
            }
        };
        self.processes.retain(|pid, _| pids.contains(pid));
        let mut scanned = 0usize;
        for pid in pids {
            let seen = *self.processes.entry(pid).or_insert(first_seen);
            let young = now.duration_since(seen) < YOUNG;
            if full || young {
                self.scan_process(pid, ebpf);
                scanned += 1;
            }
        }
        debug!(
            scanned,
            files = self.examined.len(),
            elapsed = ?now.elapsed(),
            "looked for SSL libraries"
        );
        if self.examined.len() > MAX_EXAMINED {
            self.examined.retain(|_, e| *e == Examined::Attached);
        }
        metrics::set_gauge("tls_probes_attached", "", self.links.len() as u64);
    }

    /// Looks at processes that just executed a new program, before their next periodic look.
    pub fn scan_execs(&mut self, ebpf: &mut Ebpf, pids: &[u32]) {
        let now = Instant::now();
        for &pid in pids {
            if pid == self.own_pid || !(self.only.is_empty() || self.only.contains(&pid)) {
                continue;
            }
            // A new program: young again, so libraries it loads soon are seen too.
            self.processes.insert(pid, now);
            self.scan_process(pid, ebpf);
        }
    }

    fn pids(&self) -> std::io::Result<HashSet<u32>> {
        let mut pids = HashSet::new();
        for entry in std::fs::read_dir(&self.proc_root)? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != self.own_pid && (self.only.is_empty() || self.only.contains(&pid)) {
                pids.insert(pid);
            }
        }
        Ok(pids)
    }

    fn scan_process(&mut self, pid: u32, ebpf: &mut Ebpf) {
        let dir = self.proc_root.join(pid.to_string());
        // The process may have exited since it was listed, or be a kernel thread: nothing to do.
        let Ok(maps) = std::fs::read_to_string(dir.join("maps")) else {
            return;
        };
        for m in exec_mappings(&maps) {
            let key = (m.dev, m.inode);
            if self.examined.contains_key(&key) {
                continue;
            }
            let path = dir.join("root").join(m.path.trim_start_matches('/'));
            let outcome = self.examine(&path, &m.path, pid, ebpf);
            debug!(path = %m.path, pid, ?outcome, "examined a mapped file");
            if let Some(outcome) = outcome {
                self.examined.insert(key, outcome);
            }
        }
    }

    /// What became of the file at `path` (`shown` in its process's namespace). `None` when it was
    /// reached through a process that exited meanwhile: another process that maps it, or its next
    /// exec, gets it looked at again. Failures in a live process are counted and not retried.
    fn examine(&mut self, path: &Path, shown: &str, pid: u32, ebpf: &mut Ebpf) -> Option<Examined> {
        let gone = || !self.proc_root.join(pid.to_string()).exists();
        let functions = match ssl_functions(path) {
            Ok(f) if f.is_empty() => return self.examine_go(path, shown, pid, ebpf),
            Ok(f) => f,
            Err(ElfError::NotElf) => return Some(Examined::Skip),
            Err(_) if gone() => return None,
            Err(err) => {
                let reason = match err {
                    ElfError::Malformed(_) => "malformed_elf",
                    _ => "unreadable",
                };
                count_failure(reason);
                debug!(path = %path.display(), %err, "cannot read the symbols of a mapped file");
                return Some(Examined::Skip);
            }
        };
        match attach_all(ebpf, path, &functions) {
            Ok(links) => {
                let names: Vec<&str> = functions.iter().map(|(n, _)| *n).collect();
                info!(
                    path = shown,
                    pid,
                    functions = %names.join(","),
                    "TLS probes attached"
                );
                self.links.extend(links);
                Some(Examined::Attached)
            }
            Err(_) if gone() => None,
            Err(err) => {
                count_failure("attach");
                warn!(path = shown, pid, ?err, "cannot attach TLS probes");
                Some(Examined::Skip)
            }
        }
    }
}

impl TlsProbes {
    /// [`TlsProbes::examine`] for a file that is no SSL library: a Go program using crypto/tls?
    fn examine_go(
        &mut self,
        path: &Path,
        shown: &str,
        pid: u32,
        ebpf: &mut Ebpf,
    ) -> Option<Examined> {
        let gone = || !self.proc_root.join(pid.to_string()).exists();
        let program = match gotls::go_tls_program(path) {
            Ok(Some(program)) => program,
            Ok(None) => return Some(Examined::Skip),
            Err(GoError::Unsupported(reason)) => {
                metrics::add(
                    "go_tls_unsupported_total",
                    metrics::labels(&[("reason", reason)]),
                    1,
                );
                info!(
                    path = shown,
                    pid, reason, "a Go program uses crypto/tls but cannot be probed"
                );
                return Some(Examined::Skip);
            }
            Err(GoError::Elf(_)) if gone() => return None,
            Err(GoError::Elf(err)) => {
                count_failure(match err {
                    ElfError::Malformed(_) => "malformed_elf",
                    _ => "unreadable",
                });
                debug!(path = %path.display(), %err, "cannot read a Go program");
                return Some(Examined::Skip);
            }
        };
        match gotls::attach(ebpf, path, &program) {
            Ok(links) => {
                info!(
                    path = shown,
                    pid,
                    go = %program.version,
                    symbols = program.symbols,
                    probes = links.len(),
                    "Go TLS probes attached"
                );
                self.links.extend(links);
                Some(Examined::Attached)
            }
            Err(_) if gone() => None,
            Err(err) => {
                count_failure("attach");
                warn!(path = shown, pid, ?err, "cannot attach Go TLS probes");
                Some(Examined::Skip)
            }
        }
    }
}

fn count_failure(reason: &'static str) {
    metrics::add(
        "tls_attach_failures_total",
        metrics::labels(&[("reason", reason)]),
        1,
    );
}

pub(super) fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut UProbe, ProgramError> {
    super::typed_program(ebpf, name)
}

/// Attaches entry and return probes to every function; on failure nothing stays attached.
fn attach_all(
    ebpf: &mut Ebpf,
    path: &Path,
    functions: &[(&'static str, u64)],
) -> Result<Vec<UProbeLink>, ProgramError> {
    let mut links = Vec::with_capacity(functions.len() * 2);
    for &(function, offset) in functions {
        let Some(&(_, entry, returns)) = FUNCTIONS.iter().find(|(f, ..)| *f == function) else {
            continue;
        };
        let programs = if returns {
            &[entry, RETURN_PROGRAM][..]
        } else {
            &[entry][..]
        };
        for &program in programs {
            let p = uprobe(ebpf, program)?;
            let id = p.attach(
                UProbeAttachLocation::AbsoluteOffset(offset),
                path,
                UProbeScope::AllProcesses,
            )?;
            // Dropping `links` on an early return detaches what was attached so far.
            links.push(p.take_link(id)?);
        }
    }
    Ok(links)
}

/// Loads the SSL programs into the kernel (the verifier checks them); attaching comes later.
pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), (&'static str, ProgramError)> {
    let names = FUNCTIONS
        .iter()
        .map(|(_, p, _)| *p)
        .chain([RETURN_PROGRAM])
        .chain(gotls::PROGRAMS);
    for name in names {
        uprobe(ebpf, name)
            .and_then(|p| p.load())
            .map_err(|err| (name, err))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ET_DYN: u16 = 3;

    /// How the test file indexes its symbols.
    #[derive(Debug, Clone, Copy)]
    enum Index {
        Scan,
        Gnu,
        Sysv,
    }

    /// A minimal ELF64 little-endian file of type `e_type`: sections null, .text (at vaddr
    /// 0x401000, file offset 0x200), a symbol table of type `table`, its strings and, per `index`,
    /// a hash table with one bucket. `symbols` are (name, value, shndx, type).
    fn elf(symbols: &[(&str, u64, u16, u8)], table: u32, index: Index, e_type: u16) -> Vec<u8> {
        let mut strtab = vec![0u8];
        let mut syms = vec![0u8; 24];
        for (name, value, shndx, kind) in symbols {
            let name_off = u32::try_from(strtab.len()).expect("small");
            strtab.extend_from_slice(name.as_bytes());
            strtab.push(0);
            let mut s = Vec::new();
            s.extend_from_slice(&name_off.to_le_bytes());
            s.push(0x10 | kind);
            s.push(0);
            s.extend_from_slice(&shndx.to_le_bytes());
            s.extend_from_slice(&value.to_le_bytes());
            s.extend_from_slice(&16u64.to_le_bytes());
            syms.extend_from_slice(&s);
        }
        let n = u32::try_from(symbols.len()).expect("small");
        let words = |w: &[u32]| w.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        let hash = match index {
            Index::Scan => Vec::new(),
            Index::Gnu => {
                // nbuckets 1, symoffset 1, one bloom word (all set), bucket 0 -> symbol 1.
                let mut t = words(&[1, 1, 1, 6]);
                t.extend_from_slice(&[0xff; 8]);
                t.extend(words(&[u32::from(n > 0)]));
                for (i, (name, ..)) in symbols.iter().enumerate() {
                    let end = u32::from(i + 1 == symbols.len());
                    t.extend(words(&[(gnu_hash(name.as_bytes()) & !1) | end]));
                }
                t
            }
            Index::Sysv => {
                // nbucket 1, bucket 0 -> the last symbol, each chained to the one before.
                let mut t = words(&[1, n + 1, n, 0]);
                t.extend(words(&(1..=n).map(|i| i - 1).collect::<Vec<_>>()));
                t
            }
        };
        let text_off = 0x200u64;
        let text_len = 0x100u64;
        let syms_off = text_off + text_len;
        let str_off = syms_off + syms.len() as u64;
        let hash_off = str_off + strtab.len() as u64;
        let shoff = (hash_off + hash.len() as u64).next_multiple_of(8);
        let shnum: u16 = if hash.is_empty() { 4 } else { 5 };
        let mut out = vec![0u8; 64];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[0x10..0x12].copy_from_slice(&e_type.to_le_bytes());
        out[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        out[0x3c..0x3e].copy_from_slice(&shnum.to_le_bytes());
        out.resize(text_off as usize, 0);
        out.resize((text_off + text_len) as usize, 0xcc);
        out.extend_from_slice(&syms);
        out.extend_from_slice(&strtab);
        out.extend_from_slice(&hash);
        out.resize(shoff as usize, 0);
        let shdr = |kind: u32, addr: u64, off: u64, size: u64, link: u32, entsize: u64| {
            let mut h = vec![0u8; 64];
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[16..24].copy_from_slice(&addr.to_le_bytes());
            h[24..32].copy_from_slice(&off.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            h[40..44].copy_from_slice(&link.to_le_bytes());
            h[56..64].copy_from_slice(&entsize.to_le_bytes());
            h
        };
        out.extend(shdr(0, 0, 0, 0, 0, 0));
        out.extend(shdr(1, 0x401000, text_off, text_len, 0, 0));
        out.extend(shdr(table, 0, syms_off, syms.len() as u64, 3, 24));
        out.extend(shdr(3, 0, str_off, strtab.len() as u64, 0, 0));
        let hash_kind = match index {
            Index::Scan => None,
            Index::Gnu => Some(SHT_GNU_HASH),
            Index::Sysv => Some(SHT_HASH),
        };
        if let Some(kind) = hash_kind {
            out.extend(shdr(kind, 0, hash_off, hash.len() as u64, 2, 0));
        }
        out
    }

    fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("tracer-tls-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).expect("write temp file");
        path
    }

    fn functions_of(name: &str, bytes: &[u8]) -> Result<Vec<(&'static str, u64)>, ElfError> {
        let path = write_temp(name, bytes);
        let res = ssl_functions(&path);
        std::fs::remove_file(&path).expect("remove temp file");
        res
    }

    const LIBRARY: &[(&str, u64, u16, u8)] = &[
        ("unrelated", 0x401000, 1, STT_FUNC),
        ("SSL_read", 0x401010, 1, STT_FUNC),
        ("SSL_write", 0x401040, 1, STT_FUNC),
        ("SSL_write_ex", 0x401080, 1, STT_FUNC),
        ("SSL_read_ex", 0, SHN_UNDEF, STT_FUNC),
    ];

    #[test]
    fn symbol_hashes_match_the_published_values() {
        assert_eq!(gnu_hash(b""), 5381);
        assert_eq!(gnu_hash(b"printf"), 0x156b_2bb8);
        assert_eq!(sysv_hash(b"printf"), 0x0779_05a6);
    }

    #[test]
    fn finds_defined_ssl_functions_at_file_offsets() {
        for index in [Index::Scan, Index::Gnu, Index::Sysv] {
            let found = functions_of("lib", &elf(LIBRARY, SHT_DYNSYM, index, ET_DYN));
            assert_eq!(
                found.expect("parses"),
                vec![
                    ("SSL_read", 0x210),
                    ("SSL_write", 0x240),
                    ("SSL_write_ex", 0x280)
                ],
                "{index:?}"
            );
        }
    }

    #[test]
    fn a_file_importing_ssl_functions_is_not_a_library() {
        let importer = [
            ("SSL_read", 0, SHN_UNDEF, STT_FUNC),
            ("SSL_write", 0, SHN_UNDEF, STT_FUNC),
        ];
        for index in [Index::Scan, Index::Gnu, Index::Sysv] {
            let found = functions_of("importer", &elf(&importer, SHT_DYNSYM, index, ET_DYN));
            assert_eq!(found.expect("parses"), vec![], "{index:?}");
        }
    }

    #[test]
    fn a_programs_own_symbol_table_is_searched_a_librarys_is_not() {
        let program = functions_of("program", &elf(LIBRARY, SHT_SYMTAB, Index::Scan, ET_EXEC));
        assert_eq!(program.expect("parses").len(), 3);
        let library = functions_of("library", &elf(LIBRARY, SHT_SYMTAB, Index::Scan, ET_DYN));
        assert_eq!(library.expect("parses"), vec![]);
    }

    #[test]
    fn truncated_and_foreign_files_are_errors_not_panics() {
        for index in [Index::Scan, Index::Gnu, Index::Sysv] {
            let full = elf(LIBRARY, SHT_DYNSYM, index, ET_DYN);
            for cut in [10, 64, 0x250, full.len() - 1] {
                let res = functions_of("cut", &full[..cut]);
                assert!(res.is_err(), "{index:?} cut at {cut}: {res:?}");
            }
        }
        let res = functions_of(
            "script",
            b"#!/bin/sh\necho not an ELF file at all, padded to 64 bytes....\n",
        );
        assert!(matches!(res, Err(ElfError::NotElf)), "{res:?}");
    }

    #[test]
    fn parses_executable_file_mappings_once_each() {
        let maps = "\
55d0c0a00000-55d0c0a28000 r--p 00000000 fd:01 1311 /usr/sbin/nginx
55d0c0a28000-55d0c0b00000 r-xp 00028000 fd:01 1311 /usr/sbin/nginx
7f1c2e000000-7f1c2e100000 r-xp 00020000 fd:01 2622 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2e200000-7f1c2e300000 r-xp 00001000 fd:01 2622 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2e400000-7f1c2e500000 r-xp 00000000 00:00 0
7f1c2e600000-7f1c2e700000 r-xp 00000000 00:1f 99 /tmp/my lib.so
7f1c2e800000-7f1c2e900000 r-xp 00000000 fd:01 77 /opt/gone.so (deleted)
7ffd1e5f0000-7ffd1e5f2000 r-xp 00000000 00:00 0                          [vdso]
garbage line
";
        let got = exec_mappings(maps);
        let want = vec![
            Mapping {
                dev: 0xfd << 32 | 1,
                inode: 1311,
                path: "/usr/sbin/nginx".into(),
            },
            Mapping {
                dev: 0xfd << 32 | 1,
                inode: 2622,
                path: "/usr/lib/x86_64-linux-gnu/libssl.so.3".into(),
            },
            Mapping {
                dev: 0x1f,
                inode: 99,
                path: "/tmp/my lib.so".into(),
            },
        ];
        assert_eq!(got, want);
    }
}
