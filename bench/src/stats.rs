//! The interleaved harness, the statistics and the JSON/table output.
//!
//! A case is one operation on one backend with several variants (one of them "raw", the
//! baseline). Each round runs every variant once, as a batch of `batch` operations, in an order
//! that rotates from round to round; the per-operation time of a batch is its time / `batch`.
//! The ratio of a variant is the median over rounds of (its time / raw's time in the same round),
//! so slow drifts of the (emulated, noisy) machine cancel out.

use std::hint::black_box;
use std::time::Instant;

/// One way of doing the operation: `run(n)` does it `n` times (and checks what it did).
pub struct Variant<'a> {
    pub name: &'static str,
    pub run: Box<dyn FnMut(usize) + 'a>,
}

pub fn variant<'a>(name: &'static str, run: impl FnMut(usize) + 'a) -> Variant<'a> {
    Variant { name, run: Box::new(run) }
}

/// One figure of the results.
#[derive(Clone, Debug)]
pub struct Figure {
    pub operation: String,
    pub backend: String,
    pub variant: String,
    pub median_ns: f64,
    pub min_ns: f64,
    pub max_ns: f64,
    /// Median over rounds of this variant's time / raw's time (1 for raw itself).
    pub ratio: f64,
    /// Bytes moved per operation (bulk copies), 0 otherwise.
    pub bytes: u64,
}

impl Figure {
    pub fn gbps(&self) -> Option<f64> {
        (self.bytes > 0).then(|| self.bytes as f64 / self.median_ns)
    }
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

/// Runs a case: one warm-up batch of each variant, then `rounds` interleaved rounds.
pub fn run_case(
    operation: &str,
    backend: &str,
    rounds: usize,
    batch: usize,
    bytes: u64,
    variants: Vec<Variant>,
) -> Vec<Figure> {
    let t0 = Instant::now();
    let wall = move || t0.elapsed().as_nanos() as f64;
    run_case_clocked(operation, backend, rounds, batch, bytes, variants, wall)
}

/// The calling thread's CPU time in ns: time while the thread is descheduled (a busy shared
/// host) does not count.
pub fn thread_cpu_ns() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a valid out-pointer.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

/// [`run_case`] timed by the thread's CPU time instead of the wall clock (for host-only cases
/// on a shared machine).
pub fn run_case_cpu(
    operation: &str,
    backend: &str,
    rounds: usize,
    batch: usize,
    variants: Vec<Variant>,
) -> Vec<Figure> {
    run_case_clocked(operation, backend, rounds, batch, 0, variants, thread_cpu_ns)
}

fn run_case_clocked(
    operation: &str,
    backend: &str,
    rounds: usize,
    batch: usize,
    bytes: u64,
    mut variants: Vec<Variant>,
    now: impl Fn() -> f64,
) -> Vec<Figure> {
    assert_eq!(variants[0].name, "raw", "the baseline comes first");
    eprintln!(
        "bench: {operation} [{backend}]: {rounds} rounds x {batch}, variants {}",
        names(&variants)
    );
    for v in variants.iter_mut() {
        (v.run)(batch.div_ceil(4).max(1));
    }
    let k = variants.len();
    let mut times = vec![Vec::with_capacity(rounds); k];
    for round in 0..rounds {
        for j in 0..k {
            let i = (round + j) % k;
            let t0 = now();
            (variants[i].run)(black_box(batch));
            times[i].push((now() - t0) / batch as f64);
        }
    }
    variants
        .iter()
        .zip(&times)
        .map(|(v, t)| {
            let ratios: Vec<f64> = t.iter().zip(&times[0]).map(|(a, b)| a / b).collect();
            Figure {
                operation: operation.into(),
                backend: backend.into(),
                variant: v.name.into(),
                median_ns: median(t),
                min_ns: t.iter().cloned().fold(f64::INFINITY, f64::min),
                max_ns: t.iter().cloned().fold(0.0, f64::max),
                ratio: median(&ratios),
                bytes,
            }
        })
        .collect()
}

fn names(v: &[Variant]) -> String {
    v.iter().map(|v| v.name).collect::<Vec<_>>().join(", ")
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out + "\""
}

/// One figure as one line of JSON (the merge step reads the files back line by line).
pub fn to_json(f: &Figure) -> String {
    let mut s = format!(
        "{{\"operation\": {}, \"backend\": {}, \"variant\": {}, \"median_ns\": {:.3}, \"min_ns\": {:.3}, \"max_ns\": {:.3}, \"ratio\": {:.4}",
        json_str(&f.operation),
        json_str(&f.backend),
        json_str(&f.variant),
        f.median_ns,
        f.min_ns,
        f.max_ns,
        f.ratio
    );
    if let Some(g) = f.gbps() {
        s += &format!(", \"bytes\": {}, \"gb_per_s\": {:.3}", f.bytes, g);
    }
    s + "}"
}

pub fn write_json(path: &str, figures: &[Figure], meta: &[(&str, String)]) -> std::io::Result<()> {
    let mut s = String::from("{\n");
    for (k, v) in meta {
        s += &format!("  {}: {},\n", json_str(k), json_str(v));
    }
    s += "  \"figures\": [\n";
    let lines: Vec<String> = figures.iter().map(|f| format!("    {}", to_json(f))).collect();
    s += &lines.join(",\n");
    s += "\n  ]\n}\n";
    if let Some(dir) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, s)
}

/// Reads back the figures of files written by [`write_json`] (one figure per line).
pub fn read_json(path: &str) -> Result<Vec<Figure>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("{\"operation\""))
        .map(|l| {
            parse_line(l.trim_end_matches(',')).ok_or_else(|| format!("{path}: cannot parse {l}"))
        })
        .collect()
}

fn parse_line(line: &str) -> Option<Figure> {
    let body = line.strip_prefix('{')?.strip_suffix('}')?;
    let mut f = Figure {
        operation: String::new(),
        backend: String::new(),
        variant: String::new(),
        median_ns: 0.0,
        min_ns: 0.0,
        max_ns: 0.0,
        ratio: 0.0,
        bytes: 0,
    };
    // Values never contain ", \"" (names are plain identifiers), so splitting on it is safe.
    for field in body.split(", \"") {
        let (k, v) = field.trim_start_matches('"').split_once("\": ")?;
        let s = || v.trim_matches('"').replace("\\\"", "\"").replace("\\\\", "\\");
        match k {
            "operation" => f.operation = s(),
            "backend" => f.backend = s(),
            "variant" => f.variant = s(),
            "median_ns" => f.median_ns = v.parse().ok()?,
            "min_ns" => f.min_ns = v.parse().ok()?,
            "max_ns" => f.max_ns = v.parse().ok()?,
            "ratio" => f.ratio = v.parse().ok()?,
            "bytes" => f.bytes = v.parse().ok()?,
            _ => {}
        }
    }
    Some(f)
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} us", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

/// The results as a Markdown table.
pub fn table(figures: &[Figure]) -> String {
    let mut s = String::from(
        "| operation | backend | variant | median | min | max | ratio to raw | extra |\n| --- | --- | --- | ---: | ---: | ---: | ---: | --- |\n",
    );
    for f in figures {
        let raw = figures
            .iter()
            .find(|r| r.operation == f.operation && r.backend == f.backend && r.variant == "raw")
            .map(|r| r.median_ns);
        let mut extra = String::new();
        if let Some(g) = f.gbps() {
            extra = format!("{g:.2} GB/s");
        } else if let (Some(raw), true) = (raw, f.variant != "raw") {
            extra = format!("{:+.1} ns/op", f.median_ns - raw);
        }
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {:.3} | {} |\n",
            f.operation,
            f.backend,
            f.variant,
            fmt_ns(f.median_ns),
            fmt_ns(f.min_ns),
            fmt_ns(f.max_ns),
            f.ratio,
            extra
        );
    }
    s
}
