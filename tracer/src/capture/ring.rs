//! The reader of the kernel's event ring buffer (`BPF_MAP_TYPE_RINGBUF`), which hands the kernel
//! back the space of the records it read once per batch instead of once per record.
//!
//! Every record a program reserves begins with a load of the reader's position (the consumer
//! page's first word), to check for room. A reader that stores its position after each record,
//! as aya's `RingBuf` does, writes that cache line every few hundred nanoseconds while it drains,
//! and each reservation on another CPU then misses it: more than half of `__bpf_ringbuf_reserve`'s
//! samples in a perf profile of the HTTP loop (`integration/bench/syscall_loop.c`), ~16-20 ns of
//! every traced syscall there. This reader publishes its position every `PUBLISH_BYTES` and
//! whenever it has caught up with the writers, so the space it holds back is bounded and small
//! beside the ring.
//!
//! The layout is the kernel's (`kernel/bpf/ringbuf.c`): a read-write page holding the consumer
//! position, then a read-only page holding the producer position, then the data pages mapped
//! twice in a row, so a record that wraps around the end reads as one slice. Each record is an
//! 8-byte header (`len` with the busy and discard bits, then a page offset the kernel uses) and
//! its data, padded to 8 bytes.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering, fence};

use aya::maps::MapData;

/// Record header size (`BPF_RINGBUF_HDR_SZ`).
const HEADER: usize = 8;
/// The record is reserved and not yet committed.
const BUSY_BIT: u32 = 1 << 31;
/// The record was discarded: skip it.
const DISCARD_BIT: u32 = 1 << 30;

/// Bytes the reader consumes between two stores of its position while records keep coming: ~300
/// records of captured HTTP, 1/128 of the default ring; at most 1/16 of a smaller ring.
const PUBLISH_BYTES: usize = 64 * 1024;

/// A shared memory mapping of the ring's fd, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize, prot: libc::c_int, offset: usize) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: a fresh shared mapping of a file descriptor we hold; the kernel checks the
        // length and offset against the map.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(io::ErrorKind::Other)?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Reads the records of one ring buffer map.
pub struct EventRing {
    map: MapData,
    /// The consumer page: its first word is the position the kernel reads.
    consumer: Mapping,
    /// The producer page, then the data pages twice.
    producer: Mapping,
    page: usize,
    /// The data size (a power of two).
    size: usize,
    /// Bytes read between two stores of the position (see `PUBLISH_BYTES`).
    publish_every: usize,
    /// The position of the next record to read.
    pos: usize,
    /// The position last stored in the consumer page.
    published: usize,
    /// The producer position last loaded: records up to it are reserved.
    produced: usize,
}

// SAFETY: the mappings are plain shared memory owned by this value; the reader is used by one
// task at a time (`&mut self`).
unsafe impl Send for EventRing {}

impl EventRing {
    /// Maps ring buffer `map`.
    pub fn new(map: MapData) -> io::Result<Self> {
        let size = map.info().map_err(io::Error::other)?.max_entries() as usize;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::ErrorKind::Other)?;
        if !size.is_power_of_two() || size < page {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ring buffer size {size} is not a power-of-two number of pages"),
            ));
        }
        let fd = map.fd().as_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * size, libc::PROT_READ, page)?;
        let mut ring = Self {
            map,
            consumer,
            producer,
            page,
            size,
            publish_every: PUBLISH_BYTES.min(size / 16),
            pos: 0,
            published: 0,
            produced: 0,
        };
        // A map that was used before (a pin) starts where its last reader left.
        ring.pos = ring.consumer_pos().load(Ordering::Acquire);
        ring.published = ring.pos;
        ring.produced = ring.producer_pos();
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicUsize {
        // SAFETY: the consumer page is mapped read-write, page-aligned, for as long as `self`.
        unsafe { self.consumer.ptr.cast::<AtomicUsize>().as_ref() }
    }

    fn producer_pos(&self) -> usize {
        // SAFETY: the producer page is mapped, page-aligned, for as long as `self`. The kernel
        // stores it with release order after writing the record's header.
        unsafe { self.producer.ptr.cast::<AtomicUsize>().as_ref() }.load(Ordering::Acquire)
    }

    /// The data pages, twice.
    fn data(&self) -> &[u8] {
        // SAFETY: the mapping holds `page + 2 * size` bytes; records in it change only once the
        // kernel has their space back, which it gets only behind `published`.
        unsafe {
            std::slice::from_raw_parts(self.producer.ptr.as_ptr().add(self.page), 2 * self.size)
        }
    }

    /// Stores the reader's position, giving the kernel back the space of every record read.
    fn publish(&mut self) {
        if self.published != self.pos {
            self.consumer_pos().store(self.pos, Ordering::Release);
            self.published = self.pos;
        }
    }

    /// The next record, or `None` when none is ready (every record read is then handed back).
    /// A record stays valid until the next call.
    pub fn next(&mut self) -> Option<&[u8]> {
        loop {
            if self.pos == self.produced {
                self.publish();
                // Either this load sees a record committed after the store above, or that
                // record's writer sees the store and wakes the reader (when it asked for that).
                fence(Ordering::SeqCst);
                self.produced = self.producer_pos();
                if self.pos == self.produced {
                    return None;
                }
            }
            if self.pos.wrapping_sub(self.published) >= self.publish_every {
                self.publish();
            }
            let off = self.pos & (self.size - 1);
            // SAFETY: `off + HEADER <= size` (records are 8-aligned in a ring of whole pages);
            // the kernel commits a record by an atomic exchange of this word.
            let len_word = unsafe {
                (*self.data().as_ptr().add(off).cast::<AtomicU32>()).load(Ordering::Acquire)
            };
            if len_word & BUSY_BIT != 0 {
                // Reserved, not committed: a later drain takes it (the writer's commit wakes
                // the reader if it was caught up).
                self.publish();
                return None;
            }
            let len = (len_word & !(BUSY_BIT | DISCARD_BIT)) as usize;
            let start = off + HEADER;
            if len > self.size - HEADER {
                // The kernel never writes this; stop reading rather than walk the ring.
                tracing::error!(len, "ring buffer record longer than the ring: resyncing");
                crate::metrics::add(
                    "events_dropped_total",
                    crate::metrics::labels(&[("reason", "ring_corrupt")]),
                    1,
                );
                self.pos = self.produced;
                self.publish();
                return None;
            }
            self.pos = self.pos.wrapping_add((HEADER + len).next_multiple_of(8));
            if len_word & DISCARD_BIT != 0 {
                continue;
            }
            return Some(&self.data()[start..start + len]);
        }
    }
}

impl AsFd for EventRing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.map.fd().as_fd()
    }
}

impl AsRawFd for EventRing {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl Drop for EventRing {
    fn drop(&mut self) {
        self.publish();
    }
}
