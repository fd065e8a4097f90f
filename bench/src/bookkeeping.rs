//! 6. vfiokit's DMA bookkeeping alone, on the host (no device, no guest): the IOVA allocator
//! (`IovaSpace`) and the translation map (`DmaMap`) with 1k to 1M live mappings, and a DMA
//! heap object against malloc, each against
//! the floor any such bookkeeping pays, a `BTreeMap` of the same mappings ("raw": one insert and
//! one remove per alloc+release, one predecessor lookup per translation).
//!
//! The live mappings are 4 KiB and fragmented: 2n pages allocated, a random half released.
//! Every variant checks what it did (IOVAs aligned and released, the live count unchanged,
//! translations equal to the IOVA each buffer was given) and panics otherwise.
//!
//! Timed by the thread's CPU time, not the wall clock: this part runs on the host, which may be
//! busy with other work (time descheduled would otherwise count). Cache and TLB misses, which
//! grow with the number of mappings whatever the data structure, do count: the "raw" BTreeMap
//! shows that floor at each size.

use std::collections::BTreeMap;
use std::hint::black_box;

use vfiokit::{DmaMap, Iommu, IommuKind, IovaRange, IovaSpace};

use crate::stats::{Figure, run_case_cpu, thread_cpu_ns, variant};
use crate::{MIB, Opts, batch};

const PAGE: u64 = 4096;
/// Where the translated buffers are, spaced two pages apart (translation never touches them).
const VBASE: usize = 0x7f00_0000_0000;

/// A tiny deterministic generator (the same sequence in every variant).
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x % n as u64) as usize
    }
}

/// n live 4 KiB mappings in a 256 TiB space: 2n allocated, a random half of them released (in
/// address order, so that building a million takes seconds, not minutes, on a slow host).
fn fragmented(n: usize) -> (IovaSpace, Vec<u64>) {
    let t0 = thread_cpu_ns();
    let mut s = IovaSpace::new(vec![IovaRange { start: 0, last: (1 << 48) - 1 }]);
    let all: Vec<u64> = (0..2 * n).map(|_| s.alloc(PAGE, PAGE).expect("setup alloc")).collect();
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut live = Vec::with_capacity(n);
    for (i, &iova) in all.iter().enumerate() {
        // Selection sampling: keep each with probability (still to keep) / (still to see).
        if rng.below(2 * n - i) < n - live.len() {
            live.push(iova);
        } else {
            assert!(s.release(iova, PAGE), "setup release");
        }
    }
    assert_eq!((s.len(), live.len()), (n, n));
    eprintln!(
        "bench: {n} live mappings: {} allocations and {n} releases took {:.1} ms (CPU)",
        2 * n,
        (thread_cpu_ns() - t0) / 1e6
    );
    (s, live)
}

pub(crate) fn live_name(n: usize) -> String {
    if n >= 1_000_000 { format!("{}M", n / 1_000_000) } else { format!("{}k", n / 1000) }
}

pub fn op_bookkeeping(o: &Opts) -> Vec<Figure> {
    let sizes: &[usize] =
        if o.quick { &[1_000, 10_000] } else { &[1_000, 10_000, 100_000, 1_000_000] };
    let mut out = Vec::new();
    for &n in sizes {
        out.extend(at_size(o, n));
    }
    print!("{}", scaling(&out));
    out.extend(heap(o));
    out
}

/// A 64-byte DMA heap object (alloc + free, zeroed) on a vfio-user context with no device (the
/// heap's paths are the same on every backend once its arena is mapped), against malloc +
/// zeroing + free in the same process.
fn heap(o: &Opts) -> Vec<Figure> {
    let iommu = Iommu::open(IommuKind::VfioUser).expect("a vfio-user context");
    let (p, _) = iommu.heap_alloc(64, 64).expect("the heap's first arena");
    iommu.heap_free(p.as_ptr()).expect("heap_free");
    let iommu = &iommu;
    run_case_cpu(
        "DMA heap alloc+free 64 B",
        "host",
        o.rounds,
        batch(o, 200_000),
        vec![
            variant("raw", |k| {
                for _ in 0..k {
                    // SAFETY: a fresh allocation, zeroed, then freed.
                    unsafe {
                        let p = libc::malloc(64).cast::<u8>();
                        assert!(!p.is_null(), "malloc");
                        std::ptr::write_bytes(black_box(p), 0, 64);
                        libc::free(p.cast());
                    }
                }
            }),
            variant("vfiokit", |k| {
                for _ in 0..k {
                    let (p, iova) = iommu.heap_alloc(64, 64).expect("heap_alloc");
                    assert_ne!(black_box(iova), 0, "an IOVA");
                    iommu.heap_free(p.as_ptr()).expect("heap_free");
                }
            }),
        ],
    )
}

fn at_size(o: &Opts, n: usize) -> Vec<Figure> {
    let live = live_name(n);
    let (space, iovas) = fragmented(n);
    let raw_map = || iovas.iter().map(|&i| (i, PAGE)).collect::<BTreeMap<u64, u64>>();
    // A free IOVA for the raw variants to insert and remove.
    let spare = space.clone().alloc(PAGE, PAGE).expect("a free page");
    let mut out = Vec::new();

    for (len, align, what) in [(PAGE, PAGE, "4 KiB"), (2 * MIB as u64, 2 * MIB as u64, "2 MiB")] {
        let (mut s, mut m) = (space.clone(), raw_map());
        out.extend(run_case_cpu(
            &format!("IOVA alloc+release {what}, {live} live"),
            "host",
            o.rounds,
            batch(o, 50_000),
            vec![
                variant("raw", move |k| {
                    for _ in 0..k {
                        assert!(m.insert(black_box(spare), len).is_none(), "raw: inserted");
                        assert_eq!(m.remove(&spare), Some(len), "raw: removed");
                    }
                    assert_eq!(m.len(), n);
                }),
                variant("vfiokit", move |k| {
                    for _ in 0..k {
                        let iova = s.alloc(len, align).expect("vfiokit: alloc");
                        assert!(iova % align == 0 && iova != 0, "vfiokit: aligned");
                        assert!(s.release(iova, len), "vfiokit: released");
                    }
                    assert_eq!(s.len(), n, "vfiokit: live mappings");
                }),
            ],
        ));
    }

    // Churn: release a random live mapping, allocate a new one in its place.
    let (mut s, mut live_iovas) = (space.clone(), iovas.clone());
    let (mut m, keys) = (raw_map(), iovas.clone());
    let (mut rng_raw, mut rng_v) = (XorShift(11), XorShift(11));
    out.extend(run_case_cpu(
        &format!("IOVA churn 4 KiB (release a random one, alloc), {live} live"),
        "host",
        o.rounds,
        batch(o, 20_000),
        vec![
            variant("raw", move |k| {
                for _ in 0..k {
                    let key = keys[rng_raw.below(n)];
                    assert_eq!(m.remove(&key), Some(PAGE), "raw: removed");
                    m.insert(black_box(key), PAGE);
                }
                assert_eq!(m.len(), n);
            }),
            variant("vfiokit", move |k| {
                for _ in 0..k {
                    let i = rng_v.below(n);
                    assert!(s.release(live_iovas[i], PAGE), "vfiokit: released");
                    live_iovas[i] = s.alloc(PAGE, PAGE).expect("vfiokit: alloc");
                }
                assert_eq!(s.len(), n, "vfiokit: live mappings");
                assert!(live_iovas.iter().all(|&i| i % PAGE == 0 && i != 0), "vfiokit: aligned");
            }),
        ],
    ));

    // Translation of 64 bytes at a random offset of a random buffer.
    let mut dm = DmaMap::new();
    let mut raw: BTreeMap<usize, (usize, u64)> = BTreeMap::new();
    for (i, &iova) in iovas.iter().enumerate() {
        let vaddr = VBASE + i * 2 * PAGE as usize;
        dm.insert(vaddr, PAGE as usize, iova).expect("DmaMap::insert");
        raw.insert(vaddr, (PAGE as usize, iova));
    }
    let (iovas_raw, iovas_v) = (&iovas, &iovas);
    let (mut rng_raw, mut rng_v) = (XorShift(5), XorShift(5));
    out.extend(run_case_cpu(
        &format!("translate 64 bytes, {live} mappings"),
        "host",
        o.rounds,
        batch(o, 50_000),
        vec![
            variant("raw", move |k| {
                let mut bad = 0;
                for _ in 0..k {
                    let (i, off) = (rng_raw.below(n), rng_raw.below(PAGE as usize - 64));
                    let v = VBASE + i * 2 * PAGE as usize + off;
                    let got = raw
                        .range(..=black_box(v))
                        .next_back()
                        .filter(|(s, (l, _))| v + 63 < *s + *l)
                        .map(|(s, (_, iova))| iova + (v - s) as u64);
                    bad += (got != Some(iovas_raw[i] + off as u64)) as usize;
                }
                assert_eq!(bad, 0, "raw: translations");
            }),
            variant("vfiokit", move |k| {
                let mut bad = 0;
                for _ in 0..k {
                    let (i, off) = (rng_v.below(n), rng_v.below(PAGE as usize - 64));
                    let v = VBASE + i * 2 * PAGE as usize + off;
                    let got = dm.translate(black_box(v), 64);
                    bad += (got != Some(iovas_v[i] + off as u64)) as usize;
                }
                assert_eq!(bad, 0, "vfiokit: translations");
            }),
        ],
    ));
    out
}

/// For each operation, vfiokit's per-operation time at the largest size over that at the
/// smallest (the goal: within 2x from 1k to 1M live mappings).
fn scaling(figures: &[Figure]) -> String {
    let mut s = String::from(
        "\n| scaling (vfiokit, per operation) | smallest | largest | growth |\n| --- | ---: | ---: | ---: |\n",
    );
    let family = |f: &Figure| f.operation.rsplit_once(", ").map(|(a, _)| a.to_string());
    let mut seen: Vec<String> = Vec::new();
    for f in figures.iter().filter(|f| f.variant == "vfiokit") {
        let Some(fam) = family(f) else { continue };
        if seen.contains(&fam) {
            continue;
        }
        let all: Vec<&Figure> = figures
            .iter()
            .filter(|g| g.variant == "vfiokit" && family(g).as_ref() == Some(&fam))
            .collect();
        let (first, last) = (all[0], all[all.len() - 1]);
        s += &format!(
            "| {fam} | {:.1} ns ({}) | {:.1} ns ({}) | {:.2}x |\n",
            first.median_ns,
            first.operation.rsplit_once(", ").unwrap().1,
            last.median_ns,
            last.operation.rsplit_once(", ").unwrap().1,
            last.median_ns / first.median_ns
        );
        seen.push(fam);
    }
    s
}
