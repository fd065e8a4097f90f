//! A PCI device served over vfio-user by rust-vmm's `vfio_user` server (an independent
//! implementation of the protocol, used by Cloud Hypervisor), for driving vfiokit end to end.
//! It is QEMU's edu device (1234:11e8) to a driver, so the programs written for edu run
//! unchanged against it, plus a few registers and a RAM BAR for vfiokit's own tests.
//!
//! BAR0 (1 MiB, registers, reached only by messages), as edu's:
//!   0x00 ID (0x010000ed) · 0x04 liveness (reads back the inverse of what was written) ·
//!   0x08 factorial (write n, read n!) · 0x20 status (bit 7: interrupt 0x1 when a factorial is
//!   done) · 0x24 interrupt status · 0x60 raise (ORed into the status) · 0x64 acknowledge ·
//!   0x80 DMA source · 0x88 DMA destination · 0x90 DMA count · 0x98 DMA command (bit 0 start,
//!   bit 1 device buffer to RAM, bit 2 interrupt 0x100 when done); the device's 4 KiB buffer is
//!   at DMA address 0x40000. Interrupts go to MSI when it is enabled, else to MSI-X vector 0,
//!   else to INTx, which is level-triggered and automasked, as the kernel makes it.
//! And the model's own: 0x100 resets seen · 0x108 raise: writing v signals MSI-X vector v ·
//!   0x110 peek offset / 0x114 peek value: the u32 of BAR2 at the offset, as the server sees it ·
//!   0x120 DMA error (0 ok, else the errno of the last transfer) · 0xff0 refused: every access
//!   is an error reply.
//! BAR2 (64 KiB memfd RAM): mmappable areas [0, 16K) and [32K, 64K); the hole between is
//! reached by messages.
//! BAR4 (16 KiB, read-only, mmappable whole): the u32 at offset o is `ROM_BASE + o / 4`.
//! Config space: 256 bytes, vendor 0x1234, device 0x11e8, class 0x00ff00.
//! IRQs: INTx (1), MSI (1), MSI-X (4 vectors).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Error, ErrorKind, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

use vfio_bindings::bindings::vfio::*;
use vfio_user::{
    DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion, SparseArea,
};

pub const ID: u32 = 0x010000ed;
pub const REG_LIVENESS: u64 = 0x04;
pub const REG_FACTORIAL: u64 = 0x08;
pub const REG_STATUS: u64 = 0x20;
pub const REG_IRQ_STATUS: u64 = 0x24;
pub const REG_IRQ_RAISE: u64 = 0x60;
pub const REG_IRQ_ACK: u64 = 0x64;
pub const REG_DMA_SRC: u64 = 0x80;
pub const REG_DMA_DST: u64 = 0x88;
pub const REG_DMA_COUNT: u64 = 0x90;
pub const REG_DMA_CMD: u64 = 0x98;
pub const REG_RESETS: u64 = 0x100;
pub const REG_RAISE_MSIX: u64 = 0x108;
pub const REG_PEEK_OFF: u64 = 0x110;
pub const REG_PEEK: u64 = 0x114;
pub const REG_DMA_ERROR: u64 = 0x120;
pub const REG_REFUSED: u64 = 0xff0;
pub const BAR0_LEN: u64 = 1 << 20;
pub const STATUS_IRQ_FACT: u32 = 0x80;
pub const IRQ_FACT: u32 = 0x1;
pub const IRQ_DMA: u32 = 0x100;
pub const DMA_START: u64 = 0x1;
pub const DMA_TO_RAM: u64 = 0x2;
pub const DMA_IRQ: u64 = 0x4;
pub const BUFFER: u64 = 0x40000;
pub const RAM_LEN: usize = 64 << 10;
pub const HOLE: (u64, u64) = (16 << 10, 32 << 10);
pub const ROM_LEN: usize = 16 << 10;
pub const ROM_BASE: u32 = 0xb4b4_0000;

const BUFFER_LEN: usize = 4096;

struct Mapping {
    base: *mut u8,
    size: u64,
    writable: bool,
}

struct Model {
    config: [u8; 256],
    regs: HashMap<u64, u64>,
    status: u32,
    irq_status: u32,
    buffer: [u8; BUFFER_LEN],
    ram: *mut u8,
    /// DMA memory the client gave an fd for, by IOVA.
    dma: HashMap<u64, Mapping>,
    /// Eventfds by IRQ index (INTx, MSI, MSI-X) and vector.
    irqs: [Vec<Option<File>>; 3],
    intx_masked: bool,
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

fn factorial(n: u64) -> u64 {
    (1..=n as u32).fold(1u32, |f, k| f.wrapping_mul(k)) as u64
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

    /// One transfer between RAM and the device's buffer, as edu makes it.
    fn run_dma(&mut self, cmd: u64) {
        let (src, dst, len) =
            (self.reg(REG_DMA_SRC), self.reg(REG_DMA_DST), self.reg(REG_DMA_COUNT));
        let to_ram = cmd & DMA_TO_RAM != 0;
        let (iova, at) = if to_ram { (dst, src) } else { (src, dst) };
        let in_buffer = at.checked_sub(BUFFER).filter(|&o| o + len <= BUFFER_LEN as u64);
        let error = match (in_buffer, self.dma_at(iova, len, to_ram)) {
            (Some(o), Some(ram)) => {
                let buffer = self.buffer[o as usize..][..len as usize].as_mut_ptr();
                let (from, to) = if to_ram { (buffer, ram) } else { (ram, buffer) };
                // SAFETY: both ranges checked above, one in RAM the client mapped.
                unsafe { std::ptr::copy(from, to, len as usize) };
                0
            }
            _ => libc::EFAULT as u64,
        };
        self.regs.insert(REG_DMA_ERROR, error);
        if cmd & DMA_IRQ != 0 {
            self.raise(IRQ_DMA);
        }
    }

    fn raise(&mut self, bits: u32) {
        self.irq_status |= bits;
        self.deliver();
    }

    /// Where edu would send an interrupt: MSI when enabled, else (the model's) MSI-X vector 0,
    /// else INTx, asserted while any status bit is set and masked once it fires.
    fn deliver(&mut self) {
        let index = [VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX]
            .map(|i| i as usize)
            .into_iter()
            .find(|&i| self.irqs[i].first().is_some_and(Option::is_some));
        if let Some(index) = index {
            self.signal(index, 0);
        } else if self.irq_status != 0 && !self.intx_masked {
            self.intx_masked = self.signal(VFIO_PCI_INTX_IRQ_INDEX as usize, 0);
        }
    }

    fn signal(&mut self, index: usize, vector: usize) -> bool {
        match self.irqs[index].get_mut(vector) {
            Some(Some(fd)) => fd.write_all(&1u64.to_ne_bytes()).is_ok(),
            _ => false,
        }
    }

    fn bar0_read(&self, offset: u64) -> u64 {
        match offset {
            0 => ID as u64,
            REG_LIVENESS => !self.reg(REG_LIVENESS) & 0xffff_ffff,
            REG_STATUS => self.status as u64,
            REG_IRQ_STATUS => self.irq_status as u64,
            REG_RESETS => self.resets,
            REG_PEEK => {
                let at = self.reg(REG_PEEK_OFF) as usize % RAM_LEN;
                // SAFETY: inside the RAM mapping.
                unsafe { self.ram.add(at).cast::<u32>().read_unaligned() as u64 }
            }
            other => self.reg(other),
        }
    }

    fn bar0_write(&mut self, offset: u64, value: u64) {
        match offset {
            REG_FACTORIAL => {
                self.regs.insert(REG_FACTORIAL, factorial(value));
                if self.status & STATUS_IRQ_FACT != 0 {
                    self.raise(IRQ_FACT);
                }
            }
            REG_STATUS => self.status = value as u32 & STATUS_IRQ_FACT,
            REG_IRQ_RAISE => self.raise(value as u32),
            REG_IRQ_ACK => self.irq_status &= !(value as u32),
            REG_DMA_CMD if value & DMA_START != 0 => self.run_dma(value),
            REG_RAISE_MSIX => {
                self.signal(VFIO_PCI_MSIX_IRQ_INDEX as usize, value as usize);
            }
            other => {
                self.regs.insert(other, value);
            }
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
            VFIO_PCI_BAR0_REGION_INDEX if len <= 8 => {
                data.copy_from_slice(&self.bar0_read(offset).to_ne_bytes()[..data.len()]);
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
            VFIO_PCI_BAR4_REGION_INDEX if offset + len <= ROM_LEN as u64 => {
                // SAFETY: inside the mapping, after the RAM.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.ram.add(RAM_LEN + offset as usize),
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
            VFIO_PCI_BAR0_REGION_INDEX if len <= 8 => {
                let mut bytes = [0u8; 8];
                bytes[..data.len()].copy_from_slice(data);
                self.bar0_write(offset, u64::from_ne_bytes(bytes));
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
        (self.status, self.irq_status) = (0, 0);
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
        let Some(vectors) = self.irqs.get_mut(index as usize) else { return Ok(()) };
        let range = start as usize..(start + count) as usize;
        if range.end > vectors.len() {
            return Err(Error::from(ErrorKind::InvalidInput));
        }
        let action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        match flags & VFIO_IRQ_SET_DATA_TYPE_MASK {
            VFIO_IRQ_SET_DATA_EVENTFD if action == VFIO_IRQ_SET_ACTION_TRIGGER => {
                for (slot, fd) in vectors[range].iter_mut().zip(fds) {
                    *slot = Some(fd);
                }
                if index == VFIO_PCI_INTX_IRQ_INDEX {
                    self.intx_masked = false;
                }
            }
            VFIO_IRQ_SET_DATA_NONE if count == 0 => vectors.iter_mut().for_each(|v| *v = None),
            VFIO_IRQ_SET_DATA_NONE => match action {
                VFIO_IRQ_SET_ACTION_TRIGGER => {
                    range.for_each(|v| {
                        self.signal(index as usize, v);
                    });
                }
                _ if index != VFIO_PCI_INTX_IRQ_INDEX => {}
                VFIO_IRQ_SET_ACTION_MASK => self.intx_masked = true,
                // Unmasked while still asserted: the next interrupt, as the kernel delivers it.
                _ => {
                    self.intx_masked = false;
                    self.deliver();
                }
            },
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
        // BAR2's RAM, then BAR4's read-only words.
        assert!(fd >= 0 && libc::ftruncate(fd, (RAM_LEN + ROM_LEN) as i64) == 0);
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
    regions[0].region_info = region(0, BAR0_LEN, rw);
    regions[2] = ServerRegion {
        region_info: region(2, RAM_LEN as u64, rw | VFIO_REGION_INFO_FLAG_MMAP),
        sparse_areas: [(0, HOLE.0), (HOLE.1, RAM_LEN as u64 - HOLE.1)]
            .map(|(offset, size)| SparseArea {
                area: vfio_region_sparse_mmap_area { offset, size },
            })
            .to_vec(),
        mmap_fd: Some(ram_fd.as_raw_fd()),
    };
    regions[4] = ServerRegion {
        region_info: vfio_region_info {
            offset: RAM_LEN as u64,
            ..region(4, ROM_LEN as u64, VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_MMAP)
        },
        // One sparse area covering the region: this server sends a region's fd only along
        // with a sparse-mmap capability.
        sparse_areas: vec![SparseArea {
            area: vfio_region_sparse_mmap_area { offset: 0, size: ROM_LEN as u64 },
        }],
        mmap_fd: Some(ram_fd.as_raw_fd()),
    };
    regions[7].region_info = region(7, 256, rw);
    let irq = |index, count, flags| IrqInfo { index, count, flags };
    let irqs = vec![
        irq(0, 1, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED),
        irq(1, 1, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE),
        irq(2, 4, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE),
        irq(3, 0, 0),
        irq(4, 0, 0),
    ];
    let mut config = [0u8; 256];
    config[0..4].copy_from_slice(&0x11e8_1234u32.to_le_bytes());
    config[8..12].copy_from_slice(&0x00ff_0001u32.to_le_bytes()); // revision 1, class 0x00ff00
    config[0x10..0x14].copy_from_slice(&0xfe00_0000u32.to_le_bytes()); // BAR0: 32-bit memory
    config[0x18..0x1c].copy_from_slice(&0xfd00_000cu32.to_le_bytes()); // BAR2: 64-bit prefetchable
    // Bound and listening under a temporary name, then renamed into place: a test waiting for
    // the path to appear cannot connect between bind() and listen() and be refused.
    let binding = path.with_extension("binding");
    let listener = UnixListener::bind(&binding).expect("model: bind the socket");
    std::fs::rename(&binding, path).expect("model: rename the socket into place");
    let server = Server::from_owned_fd(listener.into(), true, irqs, regions);
    config[0x20..0x24].copy_from_slice(&0xfc00_0000u32.to_le_bytes()); // BAR4: 32-bit memory
    let ram = mmap(ram_fd.as_raw_fd(), RAM_LEN + ROM_LEN, 0, true);
    for i in 0..ROM_LEN / 4 {
        // SAFETY: inside the mapping just made, aligned.
        unsafe { ram.add(RAM_LEN).cast::<u32>().add(i).write(ROM_BASE + i as u32) };
    }
    let model = Model {
        config,
        regs: HashMap::new(),
        status: 0,
        irq_status: 0,
        buffer: [0; BUFFER_LEN],
        ram,
        dma: HashMap::new(),
        irqs: [1, 1, 4].map(|n| (0..n).map(|_| None).collect()),
        intx_masked: false,
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

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: mapped by serve and dma_map, and no longer reachable.
        unsafe {
            libc::munmap(self.ram.cast(), RAM_LEN + ROM_LEN);
            for m in self.dma.values() {
                libc::munmap(m.base.cast(), m.size as usize);
            }
        }
    }
}

struct SendModel(Model);
// SAFETY: the model's pointers are to memory it maps itself; it is used by one thread.
unsafe impl Send for SendModel {}
