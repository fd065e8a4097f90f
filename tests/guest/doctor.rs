//! `doctor`: each set-up problem provoked in the guest, found, and reported with its fix.

use vfiokit::*;

use crate::common::*;

/// The findings with `code`, as "subject: message" lines.
fn found(findings: &[Finding], code: u32) -> Vec<String> {
    findings
        .iter()
        .filter(|f| f.code == code)
        .map(|f| format!("{}: {}", f.subject(), f.message()))
        .collect()
}

/// Asserts exactly one finding with `code`, of `severity`, whose text holds each of `words`.
fn reports(findings: &[Finding], code: u32, severity: u32, words: &[&str]) {
    let hits: Vec<&Finding> = findings.iter().filter(|f| f.code == code).collect();
    assert_eq!(hits.len(), 1, "one finding {code} in {findings:?}");
    assert_eq!(hits[0].severity, severity, "{:?}", hits[0]);
    let text = format!("{}: {}", hits[0].subject(), hits[0].message());
    for w in words {
        assert!(text.contains(w), "{text:?} lacks {w:?}");
    }
}

fn blockers(findings: &[Finding]) -> Vec<&Finding> {
    findings.iter().filter(|f| f.severity == SEVERITY_BLOCKER).collect()
}

pub fn doctor_finds_each_problem_with_its_fix() {
    // A device ready to use: nothing blocks, and the most severe come first.
    let edu = doctor(Some(&addr("EDU")));
    assert!(blockers(&edu).is_empty(), "edu is ready: {edu:?}");
    assert!(edu.windows(2).all(|w| w[0].severity >= w[1].severity), "most severe first");
    assert!(
        found(&edu, FINDING_IOMMU_OFF).is_empty()
            && found(&edu, FINDING_VFIO_PCI_MISSING).is_empty()
    );

    // A reset method where the kernel has one: nvme resets, edu does not (reset_where_supported).
    reports(&edu, FINDING_NO_RESET, SEVERITY_WARNING, &["no reset method", "ENOTSUP"]);
    assert!(found(&doctor(Some(&addr("NVME"))), FINDING_NO_RESET).is_empty(), "nvme resets");

    // An SR-IOV PF on vfio-pci while its enable_sriov is off (the test bed loads it on).
    let pf = addr("SRIOV_PF");
    let param = "/sys/module/vfio_pci/parameters/enable_sriov";
    assert!(found(&edu, FINDING_SRIOV_OFF).is_empty(), "enable_sriov is on: {edu:?}");
    std::fs::write(param, "N").unwrap();
    let sriov_off = doctor(None);
    std::fs::write(param, "Y").unwrap();
    reports(&sriov_off, FINDING_SRIOV_OFF, SEVERITY_WARNING, &[&pf, "enable_sriov=1", "2 VFs"]);

    // No such device.
    let none = doctor(Some("0000:00:1e.7"));
    reports(&none, FINDING_NO_DEVICE, SEVERITY_BLOCKER, &["0000:00:1e.7"]);

    // A device on no driver: the fix is the bind.
    let testdev = addr("TESTDEV");
    unbind(&testdev).unwrap();
    let unbound = doctor(Some(&testdev));
    bind(&testdev).unwrap();
    reports(
        &unbound,
        FINDING_NOT_BOUND,
        SEVERITY_BLOCKER,
        &[&testdev, "not bound to any driver", "python3 -m vfiokit bind"],
    );
    assert!(found(&doctor(Some(&testdev)), FINDING_NOT_BOUND).is_empty(), "bound again");

    // A group another driver holds a member of.
    let group = group_of("NONVIABLE");
    let nonviable = doctor(Some(&addr("NONVIABLE")));
    reports(
        &nonviable,
        FINDING_GROUP_NOT_VIABLE,
        SEVERITY_BLOCKER,
        &[
            &format!("group {group} is not viable"),
            "bound to virtio-pci",
            "bind all of its devices",
        ],
    );

    // Low locked memory, without CAP_IPC_LOCK.
    in_child(|| {
        drop_capability(CAP_IPC_LOCK);
        let rl = libc::rlimit { rlim_cur: 64 << 10, rlim_max: 64 << 10 };
        // SAFETY: plain setrlimit in the child.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) }, 0);
        let low = doctor(None);
        reports(
            &low,
            FINDING_MEMLOCK_LOW,
            SEVERITY_WARNING,
            &["RLIMIT_MEMLOCK is 65536 bytes", "ulimit -l"],
        );
        assert!(blockers(&low).is_empty(), "a warning, not a blocker: {low:?}");
    });
    assert!(found(&doctor(None), FINDING_MEMLOCK_LOW).is_empty(), "root has CAP_IPC_LOCK");

    // Nodes this process may not open.
    in_child(|| {
        // SAFETY: dropping privileges in the child only.
        assert_eq!(unsafe { libc::setgid(65534) + libc::setuid(65534) }, 0);
        let denied = doctor(Some(&addr("EDU")));
        let node = match std::path::Path::new("/dev/iommu").exists() {
            true => "/dev/iommu".to_string(),
            false => format!("/dev/vfio/{}", group_of("EDU")),
        };
        let lines = found(&denied, FINDING_NODE_PERMISSION);
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("{node}: "))
                && l.contains("Permission denied")
                && l.contains("udev rule")),
            "{node} reported unreadable: {denied:?}"
        );
        assert!(!blockers(&denied).is_empty());
    });
}
