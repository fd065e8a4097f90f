//! A small test runner for suites that must run inside the test guest (tests/vm/run).
//!
//! Run by `cargo test` on the host, the binary boots the guest and runs itself there, once per
//! entry of VFIOKIT_VM_KERNELS (default "legacy iommufd iommufd:type1 iommufd:noiommu
//! legacy:noiommu": a kernel, and the IOMMU backend forced through VFIOKIT_IOMMU; `noiommu`
//! boots a machine without an IOMMU and runs the no-IOMMU cases instead of the others); inside
//! the guest (VFIOKIT_VM_KERNEL set) it runs the cases one by one, in one thread (beside a watchdog that holds no lock), so cases
//! may fork. It never skips: a guest that cannot start fails the run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::{Command, ExitCode};
use std::sync::mpsc;
use std::time::Duration;

pub type Case = (&'static str, fn());

pub fn main(cases: &[Case], noiommu_cases: &[Case]) -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // libtest-style: an argument not starting with '-' selects cases by substring, and
    // `--skip SUBSTRING` leaves cases out (`make check` skips the cycles).
    let (mut filters, mut skips) = (Vec::new(), Vec::new());
    let mut words = args[1..].iter().map(String::as_str);
    while let Some(word) = words.next() {
        match word {
            "--skip" => skips.extend(words.next()),
            _ if !word.starts_with('-') => filters.push(word),
            _ => {}
        }
    }
    if std::env::var_os("VFIOKIT_VM_KERNEL").is_none() {
        return boot_guests(&args);
    }
    let cases = match std::env::var("VFIOKIT_VM_IOMMU").as_deref() {
        Ok("0") => noiommu_cases,
        _ => cases,
    };
    let selected: Vec<&Case> = cases
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f)))
        .filter(|(name, _)| !skips.iter().any(|s| name.contains(s)))
        .collect();
    let kernel = std::env::var("VFIOKIT_VM_KERNEL").unwrap_or_default();
    println!("running {} guest tests ({kernel} kernel)", selected.len());
    let watchdog = watchdog();
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, case) in selected {
        let started = std::time::Instant::now();
        watchdog.send(name).expect("watchdog alive");
        let outcome = catch_unwind(AssertUnwindSafe(case));
        watchdog.send("").expect("watchdog alive");
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.2}s)", started.elapsed().as_secs_f64());
            }
            Err(_) => {
                failed.push(*name);
                println!("test {name} ... FAILED");
            }
        }
    }
    for name in &failed {
        println!("failed: {name}");
    }
    println!("{passed} passed, {} failed", failed.len());
    if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// A thread that ends the run when one case outlives `VFIOKIT_CASE_TIMEOUT` seconds (180 by
/// default), naming it: a hung case must not cost the whole guest timeout, once per kernel,
/// with nothing said of where it hung. Send a case's name as it starts and "" as it ends.
fn watchdog() -> mpsc::Sender<&'static str> {
    let limit = std::env::var("VFIOKIT_CASE_TIMEOUT").ok().and_then(|s| s.parse().ok());
    let limit = Duration::from_secs(limit.unwrap_or(180));
    let (tx, rx) = mpsc::channel::<&'static str>();
    std::thread::spawn(move || {
        while let Ok(name) = rx.recv() {
            match rx.recv_timeout(limit) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    println!(
                        "test {name} ... TIMED OUT after {} s (VFIOKIT_CASE_TIMEOUT)",
                        limit.as_secs()
                    );
                    std::process::exit(1);
                }
                Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
        }
    });
    tx
}

/// On the host: run this same binary in the guest, once per kernel.
fn boot_guests(args: &[String]) -> ExitCode {
    let runner = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vm/run");
    let exe = std::env::current_exe().expect("own path");
    let runs = std::env::var("VFIOKIT_VM_KERNELS")
        .unwrap_or_else(|_| "legacy iommufd iommufd:type1 iommufd:noiommu legacy:noiommu".into());
    let mut failed = Vec::new();
    for run in runs.split_whitespace() {
        let (kernel, backend) = run.split_once(':').unwrap_or((run, ""));
        let mut cmd = Command::new(runner);
        // The whole suite in one boot: well past the runner's default 300 s under a busy host
        // (VFIOKIT_GUEST_TIMEOUT: `make soak` needs more).
        let timeout = std::env::var("VFIOKIT_GUEST_TIMEOUT").unwrap_or_else(|_| "1200".into());
        cmd.args(["--kernel", kernel, "--timeout", &timeout, "--"]).arg(&exe).args(&args[1..]);
        if backend.is_empty() {
            cmd.env_remove("VFIOKIT_IOMMU");
        } else {
            cmd.env("VFIOKIT_IOMMU", backend);
        }
        println!(
            "guest run: {kernel} kernel, {} backend",
            if backend.is_empty() { "auto" } else { backend }
        );
        let status = cmd.status().unwrap_or_else(|e| panic!("cannot start {runner}: {e}"));
        if !status.success() {
            failed.push(run);
        }
    }
    if failed.is_empty() {
        return ExitCode::SUCCESS;
    }
    eprintln!("guest tests failed on: {}", failed.join(" "));
    ExitCode::FAILURE
}
