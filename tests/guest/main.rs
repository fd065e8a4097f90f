//! vfiokit against the real kernel's VFIO, in the test guest. `cargo test --test guest` boots
//! the guest; see harness.rs.

mod backends;
mod common;
mod device;
mod dma;
mod doctor;
mod equivalence;
mod fidelity;
mod handoff;
mod handover;
mod harness;
mod irq;
mod lifecycle;
mod noiommu;
mod reset;
mod sriov;

const CASES: &[harness::Case] = &[
    ("backend_choice", backends::backend_choice),
    ("open_by_every_name_form", device::open_by_every_name_form),
    ("open_by_cdev_path", device::open_by_cdev_path),
    ("open_failures_name_their_cause", device::open_failures_name_their_cause),
    ("bind_and_unbind", device::bind_and_unbind),
    ("group_of_two_devices_opened_once", backends::group_of_two_devices_opened_once),
    ("non_viable_group_names_its_blocker", backends::non_viable_group_names_its_blocker),
    ("edu_records", device::edu_records),
    ("nvme_records_msix_mappable_mem64", device::nvme_records_msix_mappable_mem64),
    ("ivshmem_records_prefetchable_64bit", device::ivshmem_records_prefetchable_64bit),
    ("testdev_io_bar_is_not_mmappable", device::testdev_io_bar_is_not_mmappable),
    ("edu_registers_through_the_mapping", device::edu_registers_through_the_mapping),
    (
        "testdev_io_port_every_width_through_the_fd",
        device::testdev_io_port_every_width_through_the_fd,
    ),
    ("testdev_mmio_through_the_mapping", device::testdev_mmio_through_the_mapping),
    ("ivshmem_map_and_accessors_agree", device::ivshmem_map_and_accessors_agree),
    ("big_bar_far_end", device::big_bar_far_end),
    ("range_and_width_checks", device::range_and_width_checks),
    ("config_space_and_capabilities", device::config_space_and_capabilities),
    ("edu_msi_raised_interrupt_is_seen", irq::edu_msi_raised_interrupt_is_seen),
    ("edu_intx_must_be_unmasked_to_fire_again", irq::edu_intx_must_be_unmasked_to_fire_again),
    ("nvme_msix_subrange_and_trigger", irq::nvme_msix_subrange_and_trigger),
    ("err_and_req_irqs", irq::err_and_req_irqs),
    ("irq_misuse", irq::irq_misuse),
    ("reenabled_vectors_start_empty", irq::reenabled_vectors_start_empty),
    ("disable_and_cancel_end_waits", irq::disable_and_cancel_end_waits),
    ("caller_eventfds", irq::caller_eventfds),
    ("iova_ranges_and_mapping_rules", dma::iova_ranges_and_mapping_rules),
    ("edu_dma_round_trip", dma::edu_dma_round_trip),
    ("heap_objects_reach_the_device", dma::heap_objects_reach_the_device),
    ("file_mappings_reach_the_device", dma::file_mappings_reach_the_device),
    ("type1_v1_and_iommufd_compat_kinds", backends::type1_v1_and_iommufd_compat_kinds),
    ("dma_errors_are_the_kernels", fidelity::dma_errors_are_the_kernels),
    ("region_and_irq_errors_are_the_kernels", fidelity::region_and_irq_errors_are_the_kernels),
    ("dma_to_unmapped_iova_does_not_reach_memory", dma::dma_to_unmapped_iova_does_not_reach_memory),
    ("readonly_dma_memory_is_not_written", dma::readonly_dma_memory_is_not_written),
    ("p2p_dma_through_another_devices_bar", dma::p2p_dma_through_another_devices_bar),
    ("hugepage_buffers", dma::hugepage_buffers),
    ("guard_pages_stop_an_overrun", dma::guard_pages_stop_an_overrun),
    ("maps_before_the_first_device", dma::maps_before_the_first_device),
    ("dma_flag_and_buffer_misuse", dma::dma_flag_and_buffer_misuse),
    ("reset_where_supported", reset::reset_where_supported),
    ("device_info_fds_and_features", device::device_info_fds_and_features),
    ("several_devices_and_contexts", backends::several_devices_and_contexts),
    ("group_not_permitted", backends::group_not_permitted),
    ("memlock_too_low_is_named", lifecycle::memlock_too_low_is_named),
    ("open_close_cycles_leak_nothing", lifecycle::open_close_cycles_leak_nothing),
    ("open_map_alloc_cycles_leak_nothing", lifecycle::open_map_alloc_cycles_leak_nothing),
    ("threads_share_handles", lifecycle::threads_share_handles),
    ("fds_are_close_on_exec", lifecycle::fds_are_close_on_exec),
    (
        "exit_without_close_leaves_the_device_reusable",
        lifecycle::exit_without_close_leaves_the_device_reusable,
    ),
    ("second_process_gets_ebusy", lifecycle::second_process_gets_ebusy),
    (
        "a_zapped_bar_reads_all_ones_and_the_device_is_gone",
        lifecycle::a_zapped_bar_reads_all_ones_and_the_device_is_gone,
    ),
    ("handoff_to_an_unprivileged_process", handoff::handoff_to_an_unprivileged_process),
    ("malformed_handoffs_are_refused", handoff::malformed_handoffs_are_refused),
    ("live_handover_keeps_nvme_running", handover::live_handover_keeps_nvme_running),
    ("live_handover_edu_dma_and_refusals", handover::live_handover_edu_dma_and_refusals),
    ("doctor_finds_each_problem_with_its_fix", doctor::doctor_finds_each_problem_with_its_fix),
    ("hot_reset_resets_every_dependent", reset::hot_reset_resets_every_dependent),
    ("backends_agree", equivalence::backends_agree),
    ("noiommu_refused_with_its_cause", noiommu::noiommu_refused_with_its_cause),
    ("vfs_open_with_their_pfs_token", sriov::vfs_open_with_their_pfs_token),
];

/// The cases for a guest without an IOMMU (VFIOKIT_VM_KERNELS entries `KERNEL:noiommu`).
const NOIOMMU_CASES: &[harness::Case] = &[
    ("noiommu_dma_and_msi", noiommu::noiommu_dma_and_msi),
    ("noiommu_heap", noiommu::noiommu_heap),
    // Last: on the legacy kernel it unloads vfio-pci.
    ("noiommu_doctor", noiommu::noiommu_doctor),
];

fn main() -> std::process::ExitCode {
    harness::main(CASES, NOIOMMU_CASES)
}
