//! Kernel array maps created memory-mappable (`BPF_F_MMAPABLE`), mapped read-only into the
//! agent: a poll reads them like memory, without a system call, where a batched map read
//! copies slot by slot (13 ms for the connection table's default 65,536 slots here; a start
//! that read the largest table so took a second longer).

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use anyhow::Context;
use aya::maps::{Array, IterableMap, Map, MapData};

/// A read-only view of a kernel array, whose entries the kernel writes while we read.
pub struct MappedArray<T: aya::Pod> {
    entries: NonNull<T>,
    len: usize,
    /// Keeps the map (and so the mapping's object) alive while mapped.
    _map: Array<MapData, T>,
}

// SAFETY: the mapping is read-only and lives as long as the value; reading it from any
// thread is as safe as from the one that made it.
unsafe impl<T: aya::Pod> Send for MappedArray<T> {}
// SAFETY: as above; `&self` only reads.
unsafe impl<T: aya::Pod> Sync for MappedArray<T> {}

impl<T: aya::Pod> MappedArray<T> {
    /// Maps the whole of `map`; `name` names it in the error.
    pub fn map(map: Array<MapData, T>, name: &str) -> anyhow::Result<Self> {
        // The kernel lays entries out 8 bytes apart at least: a whole number of words keeps
        // its stride and ours the same.
        const { assert!(size_of::<T>().is_multiple_of(8)) };
        let len = map.len() as usize;
        // SAFETY: a fresh shared read-only mapping of the map's fd, no larger than the map's
        // data (the kernel rounds it up to whole pages); nothing else is touched.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * size_of::<T>(),
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.map().fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {name} into memory"));
        }
        let entries = NonNull::new(address.cast()).context("mmap returned a null mapping")?;
        Ok(Self {
            entries,
            len,
            _map: map,
        })
    }

    /// Maps `map`, which the loaded object keeps, through a duplicate of its descriptor: for
    /// a read before the map is taken for the poll.
    pub fn map_shared(map: &Map, name: &str) -> anyhow::Result<Self> {
        let data = Array::<&MapData, T>::try_from(map)
            .with_context(|| format!("reading {name} as an array"))?
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .with_context(|| format!("duplicating the descriptor of {name}"))?;
        let data = MapData::from_fd(data)
            .with_context(|| format!("opening the duplicate descriptor of {name}"))?;
        let array = Array::try_from(Map::Array(data))
            .with_context(|| format!("reading the duplicate of {name} as an array"))?;
        Self::map(array, name)
    }

    /// Entries in the map.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Where each entry is, in index order, for readers that must read an entry's fields in
    /// a given order; valid while `self` lives.
    pub fn entry_pointers(&self) -> impl Iterator<Item = *const T> + '_ {
        // SAFETY: every `index` is inside the mapping.
        (0..self.len).map(|index| unsafe { self.entries.as_ptr().add(index).cast_const() })
    }

    /// Every entry as it is now, in index order.
    pub fn entries(&self) -> impl Iterator<Item = T> + '_ {
        (0..self.len).map(|index| {
            // SAFETY: `index` is inside the mapping; a volatile read, since the kernel
            // writes entries while we read (the reader copes with an entry caught half
            // written).
            unsafe { self.entries.as_ptr().add(index).read_volatile() }
        })
    }
}

impl<T: aya::Pod> std::fmt::Debug for MappedArray<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedArray")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<T: aya::Pod> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of this size, unmapped once.
        unsafe {
            libc::munmap(self.entries.as_ptr().cast(), self.len * size_of::<T>());
        }
    }
}
