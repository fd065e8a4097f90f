//! A small PCI device served over vfio-user by rust-vmm's `vfio_user` server (an independent
//! implementation of the protocol, used by Cloud Hypervisor), for driving vfiokit end to end.
//!
//! BAR0 (4 KiB, registers, reached only by messages):
//!   0x00 ID (0x010000ed) · 0x04 liveness (reads back the inverse of what was written) ·
//!   0x08 resets seen · 0x10 raise: writing v signals MSI-X vector v ·
//!   0x18 peek offset / 0x1c peek value: the u32 of BAR2 at the offset, as the server sees it ·
//!   0x80 DMA source IOVA · 0x88 DMA destination IOVA · 0x90 DMA length ·
//!   0x98 DMA start (write 1: copy, then signal MSI-X vector 0) · 0xa0 DMA error (0 ok, else errno) ·
//!   0xff0 refused: every access is an error reply.
//! BAR2 (64 KiB memfd RAM): mmappable areas [0, 16K) and [32K, 64K); the hole between is
//! reached by messages.
//! Config space: 256 bytes, vendor 0x1234, device 0x11e8, class 0x00ff00.
//! IRQs: INTx (1), MSI-X (4 vectors).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Error, ErrorKind, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use vfio_bindings::bindings::vfio::*;
use vfio_user::{
    DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion, SparseArea,
};

pub const ID: u32 = 0x010000ed;
pub const REG_LIVENESS: u64 = 0x04;
pub const REG_RESETS: u64 = 0x08;
pub const REG_RAISE: u64 = 0x10;
pub const REG_PEEK_OFF: u64 = 0x18;
pub const REG_PEEK: u64 = 0x1c;
pub const REG_DMA_SRC: u64 = 0x80;
pub const REG_DMA_DST: u64 = 0x88;
pub const REG_DMA_LEN: u64 = 0x90;
pub const REG_DMA_START: u64 = 0x98;
pub const REG_DMA_ERROR: u64 = 0xa0;
pub const REG_REFUSED: u64 = 0xff0;
pub const RAM_LEN: usize = 64 << 10;
pub const HOLE: (u64, u64) = (16 << 10, 32 << 10);

struct Mapping {
    base: *mut u8,
    size: u64,
    writable: bool,
}

struct Model {
    config: [u8; 256],
    regs: HashMap<u64, u64>,
    ram: *mut u8,
    /// DMA memory the client gave an fd for, by IOVA.
    dma: HashMap<u64, Mapping>,
    msix: Vec<Option<File>>,
    resets: u64,
}

fn mmap(fd: i32, len: usize, offset: u64, writable: bool) -> *mut u8 {
    let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
    // SAFETY: a fresh shared mapping of a valid fd.
    let p =
        unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, offset as i64) };
    assert_ne!(p, libc::MAP_FAILED, "model: mmap failed: {}", Error::last_os_error());
    p.cast()
}

impl Model {
    fn reg(&self, off: u64) -> u64 {
        self.regs.get(&off).copied().unwrap_or(0)
    }

    /// The device's view of `len` bytes at `iova`, when one mapping holds them.
    fn dma_at(&self, iova: u64, len: u64, write: bool) -> Option<*mut u8> {
        self.dma.iter().find_map(|(&at, m)| {
            let inside = iova >= at && iova - at <= m.size && len <= m.size - (iova - at);
            // SAFETY (of the add): inside the mapping.
            (inside && (!write || m.writable)).then(|| unsafe { m.base.add((iova - at) as usize) })
        })
    }

    fn run_dma(&mut self) {
        let (src, dst, len) = (self.reg(REG_DMA_SRC), self.reg(REG_DMA_DST), self.reg(REG_DMA_LEN));
        let error = match (self.dma_at(src, len, false), self.dma_at(dst, len, true)) {
            (Some(s), Some(d)) => {
                // SAFETY: both ranges lie inside mappings of the client's memory.
                unsafe { std::ptr::copy(s, d, len as usize) };
                0
            }
            _ => libc::EFAULT as u64,
        };
        self.regs.insert(REG_DMA_ERROR, error);
        self.signal(0);
    }

    fn signal(&mut self, vector: usize) {
        if let Some(Some(fd)) = self.msix.get_mut(vector) {
            let _ = fd.write_all(&1u64.to_ne_bytes());
        }
    }
}

impl ServerBackend for Model {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        let len = data.len() as u64;
        match region {
            VFIO_PCI_BAR0_REGION_INDEX if offset == REG_REFUSED => {
                Err(Error::from(ErrorKind::InvalidInput))
            }
            VFIO_PCI_BAR0_REGION_INDEX => {
                let value = match offset {
                    0 => ID as u64,
                    REG_LIVENESS => !self.reg(REG_LIVENESS) & 0xffff_ffff,
                    REG_RESETS => self.resets,
                    REG_PEEK => {
                        let at = self.reg(REG_PEEK_OFF) as usize % RAM_LEN;
                        // SAFETY: inside the RAM mapping.
                        unsafe { self.ram.add(at).cast::<u32>().read_unaligned() as u64 }
                    }
                    other => self.reg(other),
                };
                data.copy_from_slice(&value.to_ne_bytes()[..data.len()]);
                Ok(())
            }
            VFIO_PCI_BAR2_REGION_INDEX if offset + len <= RAM_LEN as u64 => {
                // SAFETY: inside the RAM mapping.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.ram.add(offset as usize),
                        data.as_mut_ptr(),
                        data.len(),
                    )
                };
                Ok(())
            }
            VFIO_PCI_CONFIG_REGION_INDEX if offset + len <= 256 => {
                data.copy_from_slice(&self.config[offset as usize..(offset + len) as usize]);
                Ok(())
            }
            _ => Err(Error::from(ErrorKind::InvalidInput)),
        }
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        let len = data.len() as u64;
        match region {
            VFIO_PCI_BAR0_REGION_INDEX if offset == REG_REFUSED => {
                Err(Error::from(ErrorKind::InvalidInput))
            }
            VFIO_PCI_BAR0_REGION_INDEX => {
                let mut bytes = [0u8; 8];
                bytes[..data.len()].copy_from_slice(data);
                let value = u64::from_ne_bytes(bytes);
                match offset {
                    REG_RAISE => self.signal(value as usize),
                    REG_DMA_START if value == 1 => self.run_dma(),
                    other => {
                        self.regs.insert(other, value);
                    }
                }
                Ok(())
            }
            VFIO_PCI_BAR2_REGION_INDEX if offset + len <= RAM_LEN as u64 => {
                // SAFETY: inside the RAM mapping.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr(),
                        self.ram.add(offset as usize),
                        data.len(),
                    )
                };
                Ok(())
            }
            // Config writes are accepted and ignored (the command register and BAR sizing).
            VFIO_PCI_CONFIG_REGION_INDEX if offset + len <= 256 => Ok(()),
            _ => Err(Error::from(ErrorKind::InvalidInput)),
        }
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), Error> {
        // Memory without an fd is reached by DMA_READ/WRITE, which this server cannot send.
        let Some(fd) = fd else { return Ok(()) };
        let writable = flags.contains(DmaMapFlags::WRITE);
        let base = mmap(fd.as_raw_fd(), size as usize, offset, writable);
        self.dma.insert(address, Mapping { base, size, writable });
        Ok(())
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, address: u64, _size: u64) -> Result<(), Error> {
        if let Some(m) = self.dma.remove(&address) {
            // SAFETY: mapped by dma_map and no longer reachable.
            unsafe { libc::munmap(m.base.cast(), m.size as usize) };
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Error> {
        self.regs.clear();
        self.resets += 1;
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), Error> {
        if index != VFIO_PCI_MSIX_IRQ_INDEX {
            return Ok(());
        }
        let range = start as usize..(start + count) as usize;
        if range.end > self.msix.len() {
            return Err(Error::from(ErrorKind::InvalidInput));
        }
        match flags & (VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_DATA_NONE) {
            VFIO_IRQ_SET_DATA_EVENTFD => {
                for (slot, fd) in self.msix[range].iter_mut().zip(fds) {
                    *slot = Some(fd);
                }
            }
            _ if count == 0 => self.msix.iter_mut().for_each(|v| *v = None),
            _ if flags & VFIO_IRQ_SET_ACTION_TRIGGER != 0 => range.for_each(|v| self.signal(v)),
            _ => {}
        }
        Ok(())
    }
}

fn region(index: u32, size: u64, flags: u32) -> vfio_region_info {
    vfio_region_info { argsz: 32, flags, index, cap_offset: 0, size, offset: 0 }
}

/// Serves one connection at `path` (which must not exist) on a new thread.
pub fn serve(path: &Path) -> std::thread::JoinHandle<()> {
    // SAFETY: plain syscalls on our own fd.
    let ram_fd = unsafe {
        let fd = libc::memfd_create(c"model-bar2".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0 && libc::ftruncate(fd, RAM_LEN as i64) == 0);
        OwnedFd::from_raw_fd(fd)
    };
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    let mut regions: Vec<ServerRegion> = (0..=VFIO_PCI_CONFIG_REGION_INDEX)
        .map(|i| ServerRegion {
            region_info: region(i, 0, 0),
            sparse_areas: Vec::new(),
            mmap_fd: None,
        })
        .collect();
    regions[0].region_info = region(0, 4096, rw);
    regions[2] = ServerRegion {
        region_info: region(2, RAM_LEN as u64, rw | VFIO_REGION_INFO_FLAG_MMAP),
        sparse_areas: [(0, HOLE.0), (HOLE.1, RAM_LEN as u64 - HOLE.1)]
            .map(|(offset, size)| SparseArea {
                area: vfio_region_sparse_mmap_area { offset, size },
            })
            .to_vec(),
        mmap_fd: Some(ram_fd.as_raw_fd()),
    };
    regions[7].region_info = region(7, 256, rw);
    let irq = |index, count, flags| IrqInfo { index, count, flags };
    let irqs = vec![
        irq(0, 1, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE),
        irq(1, 0, 0),
        irq(2, 4, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE),
        irq(3, 0, 0),
        irq(4, 0, 0),
    ];
    let mut config = [0u8; 256];
    config[0..4].copy_from_slice(&0x11e8_1234u32.to_le_bytes());
    config[8..12].copy_from_slice(&0x00ff_0001u32.to_le_bytes()); // revision 1, class 0x00ff00
    config[0x10..0x14].copy_from_slice(&0xfe00_0000u32.to_le_bytes()); // BAR0: 32-bit memory
    config[0x18..0x1c].copy_from_slice(&0xfd00_000cu32.to_le_bytes()); // BAR2: 64-bit prefetchable
    let server = Server::new(path, true, irqs, regions).expect("model: bind the socket");
    let ram = mmap(ram_fd.as_raw_fd(), RAM_LEN, 0, true);
    let model = Model {
        config,
        regs: HashMap::new(),
        ram,
        dma: HashMap::new(),
        msix: (0..4).map(|_| None).collect(),
        resets: 0,
    };
    // Raw pointers are not Send; the model lives and dies on the server thread, and the RAM's
    // fd (which the server sends by number) with it.
    let model = SendModel(model);
    std::thread::spawn(move || {
        let mut model = model;
        let _ = server.run(&mut model.0);
        drop(ram_fd);
    })
}

struct SendModel(Model);
// SAFETY: the model's pointers are to memory it maps itself; it is used by one thread.
unsafe impl Send for SendModel {}
