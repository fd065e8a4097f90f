//! vfiokit's benchmark suite: each operation through vfiokit, through the raw ioctls a careful
//! hand-written driver would issue (raw.rs), and through the peer crates vfio-ioctls and
//! pci-driver (peers.rs), interleaved round by round in one process (stats.rs). Operation 6
//! (bookkeeping.rs: the IOVA allocator and the translation map alone) needs no device and runs
//! on the host. Operation 7 is DMA map + unmap with up to 100k mappings live in the context.
//! Operation 8 (vfio_user.rs) is vfio-user round trips on the host, against hand-written
//! messages on a raw socket, each side driving its own instance of the test device model.
//!
//!     vfiokit-bench [--backend type1|iommufd] [--ops 1,2,3,4,5,6,7,8] [--rounds N] [--quick] [--out FILE]
//!     vfiokit-bench --merge OUT FILE...      merge results files into OUT and print the table
//!
//! Runs in the test guest (tests/vm/run; bench/run does it all). Device addresses come from
//! VFIOKIT_TEST_EDU, _TESTDEV, _NVME and _IVSHMEM. Every variant checks what it did (edu's id
//! register, values read back, unmapped sizes, IRQ counts): a broken variant panics, it never
//! measures nothing.

mod bookkeeping;
mod peers;
mod raw;
mod stats;
mod vfio_user;

use std::cell::RefCell;
use std::hint::black_box;
use std::os::fd::AsRawFd;

use raw::Backend;
use stats::{Figure, run_case, variant};
use vfiokit::{Device, Iommu, irq::IRQ_REQ};

const EDU_ID: u32 = 0x0100_00ed;
const MIB: usize = 1 << 20;
/// Fixed IOVAs for the map benchmarks (inside every context's valid ranges).
const IOVA: u64 = 1 << 30;
const IOVA_ALLOC: u64 = 2 << 30;
/// Where operation 7's raw context keeps its live mappings.
const IOVA_FILL: u64 = 4 << 30;

struct Opts {
    backend: Backend,
    ops: Vec<u32>,
    rounds: usize,
    quick: bool,
    out: String,
}

fn env_addr(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run in the test guest (bench/run, tests/vm/run)")
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--merge") {
        return merge(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("--dma-pairs") {
        return dma_pairs_main(&args[1..]);
    }
    let mut o = Opts {
        backend: match std::env::var("VFIOKIT_IOMMU").as_deref() {
            Ok("iommufd") => Backend::Iommufd,
            _ => Backend::Type1,
        },
        ops: vec![1, 2, 3, 4, 5],
        rounds: 21,
        quick: false,
        out: "target/bench/results.json".into(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{a} needs a value")).clone();
        match a.as_str() {
            "--backend" => {
                o.backend = match val().as_str() {
                    "type1" => Backend::Type1,
                    "iommufd" => Backend::Iommufd,
                    b => panic!("unknown backend {b}"),
                }
            }
            "--ops" => {
                o.ops = val().split(',').map(|s| s.trim().parse().expect("--ops 1,2,...")).collect()
            }
            "--rounds" => o.rounds = val().parse().expect("--rounds N"),
            "--quick" => o.quick = true,
            "--out" => o.out = val(),
            "-h" | "--help" => {
                println!(
                    "usage: vfiokit-bench [--backend type1|iommufd] [--ops 1,2,3,4,5,6,7,8] [--rounds N] [--quick] [--out FILE]"
                );
                println!("       vfiokit-bench --merge OUT FILE...");
                return;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    if o.quick && !args.iter().any(|a| a == "--rounds") {
        o.rounds = 3;
    }
    // Operations 6 and 8 run on the host, with no kernel backend.
    let host_only = o.ops.iter().all(|&op| op == 6 || op == 8);
    let b = if host_only { "host" } else { o.backend.name() };
    eprintln!(
        "bench: backend {b}, ops {:?}, {} rounds{}",
        o.ops,
        o.rounds,
        if o.quick { " (quick)" } else { "" }
    );
    let mut figures = Vec::new();
    for &op in &o.ops {
        let f = match op {
            1 => op_open(&o),
            2 => op_registers(&o),
            3 => op_copy(&o),
            4 => op_dma(&o),
            5 => op_irq(&o),
            6 => bookkeeping::op_bookkeeping(&o),
            7 => op_dma_at_scale(&o),
            8 => vfio_user::op_vfio_user(&o),
            _ => panic!("no operation {op} (1..8)"),
        };
        print!("{}", stats::table(&f));
        figures.extend(f);
    }
    let meta = [
        ("backend", b.to_string()),
        ("kernel", std::env::var("VFIOKIT_VM_KERNEL").unwrap_or_default()),
        ("rounds", o.rounds.to_string()),
        ("quick", o.quick.to_string()),
    ];
    stats::write_json(&o.out, &figures, &meta).expect("writing the results");
    eprintln!("bench: {} figures written to {}", figures.len(), o.out);
}

fn merge(args: &[String]) {
    let (out, files) = args.split_first().expect("--merge OUT FILE...");
    let mut figures: Vec<Figure> = Vec::new();
    for f in files {
        figures.extend(stats::read_json(f).unwrap_or_else(|e| panic!("{e}")));
    }
    stats::write_json(out, &figures, &[("merged_from", files.join(" "))])
        .expect("writing the merged results");
    print!("{}", stats::table(&figures));
    eprintln!("bench: {} figures written to {out}", figures.len());
}

/// Batch size: `full` normally, a tenth (at least 1) with --quick.
fn batch(o: &Opts, full: usize) -> usize {
    if o.quick { (full / 10).max(1) } else { full }
}

fn kind(b: Backend) -> vfiokit::IommuKind {
    match b {
        Backend::Type1 => vfiokit::IommuKind::Type1,
        Backend::Iommufd => vfiokit::IommuKind::Iommufd,
    }
}

fn check_edu_records(dev: &Device) {
    assert_eq!(dev.regions()[0].size, MIB as u64, "edu BAR0 is 1 MiB");
    assert!(dev.irqs().len() >= 5 && dev.irqs()[1].count >= 1, "edu has MSI and REQ");
    black_box(dev.areas().len());
}

/// Reads `n` times and checks every value. The accumulator is folded, not a `mut` local the
/// final assert takes by reference: a local whose address escapes is stored to memory before
/// every call in the loop (the accessors' out-of-line path is one), which the raw loop, with
/// no call, would not pay.
#[inline(always)]
pub(crate) fn read_n(n: usize, want: u32, what: &str, read: impl Fn() -> u32) {
    let bad = (0..n).fold(0, |bad, _| bad | (read() ^ want));
    assert_eq!(bad, 0, "{what}");
}

/// vfiokit's open + enumeration + close. Not inlined, like the other variants' (raw.rs,
/// peers.rs), so that a profiler tells them apart.
#[inline(never)]
fn open_enumerate_close(k: vfiokit::IommuKind, edu: &str) {
    let iommu = Iommu::open(k).expect("vfiokit: Iommu::open");
    let dev = Device::open(edu, Some(&iommu)).expect("vfiokit: Device::open");
    check_edu_records(&dev);
    drop(dev);
    drop(iommu);
}

/// 1. Open from scratch + full enumeration + close.
fn op_open(o: &Opts) -> Vec<Figure> {
    let edu = env_addr("VFIOKIT_TEST_EDU");
    let (backend, k) = (o.backend, kind(o.backend));
    let mut v = vec![
        variant("raw", |n| {
            for _ in 0..n {
                let e = raw::open_enumerate_close(backend, &edu);
                assert_eq!(e.region_sizes[0], MIB as u64, "raw: edu BAR0 size");
                assert!(e.irq_counts[1] >= 1, "raw: edu MSI");
                black_box(&e);
            }
        }),
        variant("vfiokit", |n| {
            for _ in 0..n {
                open_enumerate_close(k, &edu);
            }
        }),
        variant("vfio-ioctls", |n| {
            for _ in 0..n {
                let (bar0, msi) = peers::vmm_open_enumerate_close(backend, &edu);
                assert!(bar0 == MIB as u64 && msi >= 1, "vfio-ioctls: edu records");
            }
        }),
    ];
    if backend == Backend::Type1 {
        v.push(variant("pci-driver", |n| {
            for _ in 0..n {
                assert_eq!(
                    peers::pd_open_enumerate_close(&edu),
                    MIB as u64,
                    "pci-driver: edu BAR0"
                );
            }
        }));
    }
    run_case("open+enumerate+close (edu)", backend.name(), o.rounds, batch(o, 10), 0, v)
}

/// 2. 32-bit register accesses through the accessors vs a volatile access on the same mapping.
fn op_registers(o: &Opts) -> Vec<Figure> {
    let mut out = Vec::new();
    let iommu = Iommu::open(kind(o.backend)).expect("Iommu::open");
    let edu = Device::open(&env_addr("VFIOKIT_TEST_EDU"), Some(&iommu)).expect("open edu");
    let bar0 = edu.map(0).expect("map edu BAR0").as_ptr();
    let id = edu.register::<u32>(0, 0).expect("edu id register");
    let liveness = edu.register::<u32>(0, 4).expect("edu liveness register");
    let be = "any";

    let n = batch(o, 20_000);
    out.extend(run_case(
        "read32 edu BAR0 0x00 (MMIO trap)",
        be,
        o.rounds,
        n,
        0,
        vec![
            variant("raw", |n| {
                read_n(n, EDU_ID, "raw: edu id register", || {
                    // SAFETY: offset 0 of the mapped BAR, aligned.
                    unsafe { bar0.cast::<u32>().read_volatile() }
                })
            }),
            variant("vfiokit", |n| {
                read_n(n, EDU_ID, "vfiokit: edu id register", || {
                    edu.read_reg::<u32>(0, 0).expect("read_reg")
                })
            }),
            variant("register", |n| read_n(n, EDU_ID, "register: edu id register", || id.read())),
        ],
    ));

    let mut seq = 0u32;
    let check_liveness = |seq: u32| {
        let back = edu.read_reg::<u32>(0, 4).expect("read liveness");
        assert_eq!(back, !seq, "edu liveness register returns ~value");
    };
    let seq_raw = std::cell::Cell::new(0u32);
    out.extend(run_case(
        "write32 edu BAR0 0x04 (MMIO trap)",
        be,
        o.rounds,
        n,
        0,
        vec![
            variant("raw", |n| {
                let mut s = seq_raw.get();
                for _ in 0..n {
                    s = s.wrapping_add(1);
                    // SAFETY: offset 4 of the mapped BAR, aligned.
                    unsafe { bar0.add(4).cast::<u32>().write_volatile(s) };
                }
                seq_raw.set(s);
                // SAFETY: as above.
                assert_eq!(
                    unsafe { bar0.add(4).cast::<u32>().read_volatile() },
                    !s,
                    "raw: liveness"
                );
            }),
            variant("vfiokit", |n| {
                for _ in 0..n {
                    seq = seq.wrapping_add(1);
                    edu.write_reg::<u32>(0, 4, seq).expect("write_reg");
                }
                check_liveness(seq);
            }),
            variant("register", |n| {
                let mut s = seq_raw.get();
                for _ in 0..n {
                    s = s.wrapping_add(1);
                    liveness.write(s);
                }
                seq_raw.set(s);
                assert_eq!(liveness.read(), !s, "register: liveness");
            }),
        ],
    ));
    drop(edu);

    let ivshmem =
        Device::open(&env_addr("VFIOKIT_TEST_IVSHMEM"), Some(&iommu)).expect("open ivshmem");
    let bar2 = ivshmem.map(2).expect("map ivshmem BAR2").as_ptr();
    const OFF: usize = 0x100;
    const PATTERN: u32 = 0x5a5a_1234;
    // SAFETY: inside the mapped BAR (64 MiB).
    unsafe { bar2.add(OFF).cast::<u32>().write_volatile(PATTERN) };
    let word = ivshmem.register::<u32>(2, OFF as u64).expect("ivshmem register");
    let n = batch(o, 1_000_000);
    out.extend(run_case(
        "read32 ivshmem BAR2 (RAM)",
        be,
        o.rounds,
        n,
        0,
        vec![
            variant("raw", |n| {
                read_n(n, PATTERN, "raw: ivshmem pattern", || {
                    // SAFETY: inside the mapped BAR, aligned.
                    unsafe { bar2.add(OFF).cast::<u32>().read_volatile() }
                })
            }),
            variant("vfiokit", |n| {
                read_n(n, PATTERN, "vfiokit: ivshmem pattern", || {
                    ivshmem.read_reg::<u32>(2, OFF as u64).expect("read_reg")
                })
            }),
            variant("register", |n| {
                read_n(n, PATTERN, "register: ivshmem pattern", || word.read())
            }),
        ],
    ));
    const WOFF: usize = 0x200;
    let written = ivshmem.register::<u32>(2, WOFF as u64).expect("ivshmem register");
    out.extend(run_case(
        "write32 ivshmem BAR2 (RAM)",
        be,
        o.rounds,
        n,
        0,
        vec![
            variant("raw", |n| {
                for i in 0..n as u32 {
                    // SAFETY: inside the mapped BAR, aligned.
                    unsafe { bar2.add(WOFF).cast::<u32>().write_volatile(i) };
                }
                // SAFETY: as above.
                assert_eq!(
                    unsafe { bar2.add(WOFF).cast::<u32>().read_volatile() },
                    n as u32 - 1,
                    "raw: written"
                );
            }),
            variant("vfiokit", |n| {
                for i in 0..n as u32 {
                    ivshmem.write_reg::<u32>(2, WOFF as u64, i).expect("write_reg");
                }
                // SAFETY: inside the mapped BAR, aligned.
                assert_eq!(
                    unsafe { bar2.add(WOFF).cast::<u32>().read_volatile() },
                    n as u32 - 1,
                    "vfiokit: written"
                );
            }),
            variant("register", |n| {
                for i in 0..n as u32 {
                    written.write(i);
                }
                // SAFETY: inside the mapped BAR, aligned.
                assert_eq!(
                    unsafe { bar2.add(WOFF).cast::<u32>().read_volatile() },
                    n as u32 - 1,
                    "register: written"
                );
            }),
        ],
    ));
    out
}

/// 3. Bulk copies of 1 MiB into and out of ivshmem's mapped RAM BAR.
fn op_copy(o: &Opts) -> Vec<Figure> {
    let mut out = Vec::new();
    let iommu = Iommu::open(kind(o.backend)).expect("Iommu::open");
    let dev = Device::open(&env_addr("VFIOKIT_TEST_IVSHMEM"), Some(&iommu)).expect("open ivshmem");
    let bar2 = dev.map(2).expect("map BAR2").as_ptr();
    let len = MIB;
    let src = RefCell::new((0..len).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>());
    let dst = RefCell::new(vec![0u8; len]);
    let ram = RefCell::new(vec![0u8; len]);
    // Fault the BAR pages in before timing.
    // SAFETY: the BAR is 64 MiB; src is len bytes.
    unsafe { std::ptr::copy_nonoverlapping(src.borrow().as_ptr(), bar2, len) };
    let n = batch(o, 40);
    let tag = std::cell::Cell::new(0u64);
    let next_tag = || {
        tag.set(tag.get() + 1);
        tag.get()
    };
    let stamp = |src: &mut [u8]| {
        let t = next_tag();
        src[..8].copy_from_slice(&t.to_ne_bytes());
        t
    };
    // SAFETY (all unsafe blocks below): bar2..bar2+len is inside the mapping, and the buffers
    // are len bytes.
    let bar_head = || unsafe { bar2.cast::<u64>().read_volatile() };
    let bar_tail = || unsafe { bar2.add(len - 1).read_volatile() };
    let set_head = |t: u64| unsafe { bar2.cast::<u64>().write_volatile(t) };
    let (src, dst, ram, dev) = (&src, &dst, &ram, &dev);
    out.extend(run_case(
        "write 1 MiB into ivshmem BAR2",
        "any",
        o.rounds,
        n,
        len as u64,
        vec![
            variant("raw", |n| {
                let s = &mut *src.borrow_mut();
                let t = stamp(s);
                for _ in 0..n {
                    unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), bar2, len) };
                }
                assert!(bar_head() == t && bar_tail() == s[len - 1], "raw: copied");
            }),
            variant("vfiokit", |n| {
                let s = &mut *src.borrow_mut();
                let t = stamp(s);
                for _ in 0..n {
                    dev.write(2, 0, s).expect("write");
                }
                assert!(bar_head() == t && bar_tail() == s[len - 1], "vfiokit: copied");
            }),
            variant("memcpy RAM->RAM", |n| {
                let s = &mut *src.borrow_mut();
                let r = &mut *ram.borrow_mut();
                let t = stamp(s);
                for _ in 0..n {
                    unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), r.as_mut_ptr(), len) };
                    black_box(&mut *r);
                }
                assert!(r[..8] == t.to_ne_bytes(), "memcpy: copied");
            }),
        ],
    ));
    out.extend(run_case(
        "read 1 MiB from ivshmem BAR2",
        "any",
        o.rounds,
        n,
        len as u64,
        vec![
            variant("raw", |n| {
                let d = &mut *dst.borrow_mut();
                let t = next_tag();
                set_head(t);
                for _ in 0..n {
                    unsafe { std::ptr::copy_nonoverlapping(bar2, d.as_mut_ptr(), len) };
                    black_box(&mut *d);
                }
                assert!(d[..8] == t.to_ne_bytes() && d[len - 1] == bar_tail(), "raw: read");
            }),
            variant("vfiokit", |n| {
                let d = &mut *dst.borrow_mut();
                let t = next_tag();
                set_head(t);
                for _ in 0..n {
                    dev.read(2, 0, d).expect("read");
                    black_box(&mut *d);
                }
                assert!(d[..8] == t.to_ne_bytes() && d[len - 1] == bar_tail(), "vfiokit: read");
            }),
            variant("memcpy RAM->RAM", |n| {
                let d = &mut *dst.borrow_mut();
                let s = src.borrow();
                for _ in 0..n {
                    unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), d.as_mut_ptr(), len) };
                    black_box(&mut *d);
                }
                assert!(d[len - 1] == s[len - 1], "memcpy: read");
            }),
        ],
    ));
    out
}

/// 4. DMA map + unmap of pre-faulted buffers, and dma_alloc + free.
/// `--dma-pairs KIND N LIVE` (bench/callgrind-dma): N pairs of one DMA operation on a 4 KiB
/// page, in a context of the backend VFIOKIT_IOMMU names with edu attached and LIVE other
/// mappings in it: `map_any` (+ unmap), `map` (fixed IOVA, + unmap), `alloc` (+ free) or `heap`
/// (a 64-byte heap object: heap_alloc + heap_free). Callgrind counts `dma_pairs` alone.
fn dma_pairs_main(args: &[String]) {
    let [kind_name, n, live] = args else { panic!("--dma-pairs KIND N LIVE") };
    let (n, live): (usize, usize) = (n.parse().expect("N"), live.parse().expect("LIVE"));
    let iommu = Iommu::open_auto().expect("Iommu::open");
    let _edu = Device::open(&env_addr("VFIOKIT_TEST_EDU"), Some(&iommu)).expect("open edu");
    let pool = raw::Prefaulted::new((live + 1) * 4096, 4096);
    for i in 0..live {
        // SAFETY: the pool outlives the context's mappings (the process ends first).
        unsafe { iommu.map_any(pool.ptr.add((i + 1) * 4096), 4096) }.expect("a live mapping");
    }
    if kind_name == "heap" {
        // The heap's first arena, made before the counting starts.
        let (p, _) = iommu.heap_alloc(64, 64).expect("heap_alloc");
        iommu.heap_free(p.as_ptr()).expect("heap_free");
    }
    dma_pairs(&iommu, kind_name, pool.ptr, n);
    println!("{kind_name}: {n} pairs with {live} live mappings, backend {:?}", iommu.kind());
}

#[inline(never)]
fn dma_pairs(iommu: &Iommu, kind_name: &str, page: *mut u8, n: usize) {
    for _ in 0..n {
        match kind_name {
            // SAFETY: the page outlives the mapping, removed right away.
            "map_any" => {
                let iova = unsafe { iommu.map_any(page, 4096) }.expect("map_any");
                iommu.unmap(iova, 4096).expect("unmap");
            }
            "map" => {
                // SAFETY: as above.
                unsafe { iommu.map(page, 4096, IOVA) }.expect("map");
                iommu.unmap(IOVA, 4096).expect("unmap");
            }
            "alloc" => {
                let (p, _) = iommu.alloc(4096).expect("alloc");
                iommu.free(p.as_ptr()).expect("free");
            }
            "heap" => {
                let (p, _) = iommu.heap_alloc(64, 64).expect("heap_alloc");
                iommu.heap_free(p.as_ptr()).expect("heap_free");
            }
            other => panic!("no DMA pair {other}"),
        }
    }
}

fn op_dma(o: &Opts) -> Vec<Figure> {
    let backend = o.backend;
    let b = backend.name();
    // One context per variant, each with its own device, held for the whole operation: a group
    // or cdev can be open in one context only, and an IOAS without a device skips the IOMMU.
    let iommu = Iommu::open(kind(backend)).expect("Iommu::open");
    let _edu =
        Device::open(&env_addr("VFIOKIT_TEST_EDU"), Some(&iommu)).expect("vfiokit: open edu");
    let rawctx = raw::Ctx::open(backend, &env_addr("VFIOKIT_TEST_TESTDEV"));
    let vmm = peers::VmmCtx::open(backend, &env_addr("VFIOKIT_TEST_NVME"));
    let pd =
        (backend == Backend::Type1).then(|| peers::PdCtx::open(&env_addr("VFIOKIT_TEST_IVSHMEM")));
    let buf = raw::Prefaulted::new(64 * MIB, 2 * MIB);
    let mut out = Vec::new();
    for (len, full) in [(4096usize, 400usize), (2 * MIB, 40), (64 * MIB, 2)] {
        let p = buf.ptr;
        let name = format!("DMA map+unmap {}", size_name(len));
        let (iommu, rawctx, vmm) = (&iommu, &rawctx, &vmm);
        let mut v = vec![
            variant("raw", move |n| {
                for _ in 0..n {
                    // SAFETY: buf outlives the mapping, which is removed right away.
                    unsafe { rawctx.map(p, len, IOVA) };
                    rawctx.unmap(IOVA, len);
                }
            }),
            variant("vfiokit", move |n| {
                for _ in 0..n {
                    // SAFETY: as above.
                    unsafe { iommu.map(p, len, IOVA) }.expect("vfiokit: map");
                    iommu.unmap(IOVA, len).expect("vfiokit: unmap");
                }
            }),
            variant("vfiokit map_any", move |n| {
                for _ in 0..n {
                    // SAFETY: as above.
                    let iova = unsafe { iommu.map_any(p, len) }.expect("vfiokit: map_any");
                    iommu.unmap(iova, len).expect("vfiokit: unmap");
                }
            }),
            variant("vfio-ioctls", move |n| {
                for _ in 0..n {
                    // SAFETY: as above.
                    unsafe { vmm.map(p, len, IOVA) };
                    vmm.unmap(IOVA, len);
                }
            }),
        ];
        if let Some(pd) = &pd {
            v.push(variant("pci-driver", move |n| {
                for _ in 0..n {
                    // SAFETY: as above.
                    unsafe { pd.map(p, len, IOVA) };
                    pd.unmap(IOVA, len);
                }
            }));
        }
        out.extend(run_case(&name, b, o.rounds, batch(o, full), 0, v));
    }
    for (len, full) in [(4096usize, 200usize), (2 * MIB, 20), (64 * MIB, 1)] {
        let (iommu, rawctx) = (&iommu, &rawctx);
        out.extend(run_case(
            &format!("dma_alloc+free {}", size_name(len)),
            b,
            o.rounds,
            batch(o, full),
            0,
            vec![
                variant("raw", move |n| {
                    for _ in 0..n {
                        let p = rawctx.alloc(len, IOVA_ALLOC);
                        rawctx.free(p, len, IOVA_ALLOC);
                    }
                }),
                variant("vfiokit", move |n| {
                    for _ in 0..n {
                        let (p, iova) = iommu.alloc(len).expect("vfiokit: alloc");
                        assert!(iova != 0 || len > 0);
                        iommu.free(p.as_ptr()).expect("vfiokit: free");
                    }
                }),
            ],
        ));
    }
    out
}

/// 7. DMA map + unmap of one more 4 KiB page while 1k, 10k and 100k mappings are live in the
/// context (--quick: 1k): vfiokit's map_any (allocator, bookkeeping, ioctls) against the raw
/// map and unmap ioctls at a fixed IOVA in a raw context holding as many mappings. The
/// kernel's share grows with them (type1 keeps an rbtree, iommufd an interval tree); vfiokit's
/// own should not. The live mappings are the pages of a 64 MiB buffer in turn, as a driver maps
/// its buffers (at 100k each page is mapped at most 7 times: vfiokit's translation map keeps
/// mappings of the same memory in separate layers, and one page mapped n times costs O(n) a
/// map). type1 caps a container at vfio_iommu_type1.dma_entry_limit mappings, 65535 by
/// default: bench/run raises it.
fn op_dma_at_scale(o: &Opts) -> Vec<Figure> {
    const PAGE: usize = 4096;
    const POOL: usize = 64 * MIB;
    let sizes: &[usize] = if o.quick { &[1_000] } else { &[1_000, 10_000, 100_000] };
    let iommu = Iommu::open(kind(o.backend)).expect("Iommu::open");
    let _edu =
        Device::open(&env_addr("VFIOKIT_TEST_EDU"), Some(&iommu)).expect("vfiokit: open edu");
    let rawctx = raw::Ctx::open(o.backend, &env_addr("VFIOKIT_TEST_TESTDEV"));
    let pool = raw::Prefaulted::new(POOL, PAGE);
    // SAFETY (of the add): inside the pool.
    let page_of = |i: usize| unsafe { pool.ptr.add(i * PAGE % POOL) };
    // The page the timed map+unmap maps: one the live mappings also map.
    let p = page_of(0);
    let mut live: Vec<u64> = Vec::new();
    let mut out = Vec::new();
    for &n in sizes {
        let t0 = std::time::Instant::now();
        for i in live.len()..n {
            // SAFETY: the pool outlives every mapping of it (all removed below).
            live.push(unsafe { iommu.map_any(page_of(i), PAGE) }.expect("vfiokit: a live mapping"));
            // SAFETY: as above.
            unsafe { rawctx.map(page_of(i), PAGE, IOVA_FILL + (i * PAGE) as u64) };
        }
        eprintln!(
            "bench: {n} live mappings in each context, made in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        let (iommu, rawctx) = (&iommu, &rawctx);
        out.extend(run_case(
            &format!("DMA map+unmap 4 KiB, {} live", bookkeeping::live_name(n)),
            o.backend.name(),
            o.rounds,
            batch(o, 200),
            0,
            vec![
                variant("raw", move |k| {
                    for _ in 0..k {
                        // SAFETY: as above.
                        unsafe { rawctx.map(p, PAGE, IOVA) };
                        rawctx.unmap(IOVA, PAGE);
                    }
                }),
                variant("vfiokit map_any", move |k| {
                    for _ in 0..k {
                        // SAFETY: as above.
                        let iova = unsafe { iommu.map_any(p, PAGE) }.expect("vfiokit: map_any");
                        iommu.unmap(iova, PAGE).expect("vfiokit: unmap");
                    }
                }),
            ],
        ));
    }
    for (i, &iova) in live.iter().enumerate() {
        iommu.unmap(iova, PAGE).expect("vfiokit: unmap a live mapping");
        rawctx.unmap(IOVA_FILL + (i * PAGE) as u64, PAGE);
    }
    out
}

fn size_name(len: usize) -> String {
    if len >= MIB { format!("{} MiB", len / MIB) } else { format!("{} KiB", len / 1024) }
}

/// 5. Interrupt round trip: trigger the REQ irq (index 4) from userspace, wait for its eventfd.
/// Run twice: vfiokit on edu and raw on pci-testdev, then swapped, so that a difference between
/// the two devices' paths cannot pass for vfiokit's overhead.
fn op_irq(o: &Opts) -> Vec<Figure> {
    let (edu, testdev) = (env_addr("VFIOKIT_TEST_EDU"), env_addr("VFIOKIT_TEST_TESTDEV"));
    let mut out = irq_case(o, "irq trigger+wait (REQ)", &edu, &testdev);
    out.extend(irq_case(o, "irq trigger+wait (REQ), devices swapped", &testdev, &edu));
    out
}

fn irq_case(o: &Opts, name: &str, vfiokit_dev: &str, raw_dev: &str) -> Vec<Figure> {
    let backend = o.backend;
    let iommu = Iommu::open(kind(backend)).expect("Iommu::open");
    let dev = Device::open(vfiokit_dev, Some(&iommu)).expect("vfiokit: open");
    let own_efd = dev.irq_enable(IRQ_REQ, 0, 1).expect("vfiokit: enable REQ")[0];
    let own_dfd = dev.fd().expect("vfiokit: device fd").as_raw_fd();
    let rawctx = raw::Ctx::open(backend, raw_dev);
    let dfd = rawctx.device.as_raw_fd();
    let efd = raw::irq_enable(dfd, IRQ_REQ);
    let efd_raw = efd.as_raw_fd();
    let dev = &dev;
    run_case(
        name,
        backend.name(),
        o.rounds,
        batch(o, 2000),
        0,
        vec![
            variant("raw", move |n| {
                for _ in 0..n {
                    assert_eq!(raw::irq_round_trip(dfd, IRQ_REQ, efd_raw), 1, "raw: one interrupt");
                }
            }),
            variant("vfiokit", move |n| {
                for _ in 0..n {
                    dev.irq_trigger(IRQ_REQ, 0).expect("vfiokit: trigger");
                    assert_eq!(
                        dev.irq_wait(IRQ_REQ, 0, -1).expect("vfiokit: wait"),
                        1,
                        "vfiokit: one interrupt"
                    );
                }
            }),
            // The raw calls on vfiokit's own device fd and (non-blocking) eventfd: what the
            // library's code adds, apart from any difference in the kernel objects.
            variant("raw on vfiokit's fds", move |n| {
                for _ in 0..n {
                    assert_eq!(
                        raw::irq_round_trip(own_dfd, IRQ_REQ, own_efd),
                        1,
                        "raw: one interrupt"
                    );
                }
            }),
            variant("vfiokit 1s timeout", move |n| {
                for _ in 0..n {
                    dev.irq_trigger(IRQ_REQ, 0).expect("vfiokit: trigger");
                    assert_eq!(
                        dev.irq_wait(IRQ_REQ, 0, 1000).expect("vfiokit: wait"),
                        1,
                        "vfiokit: one interrupt"
                    );
                }
            }),
        ],
    )
}
