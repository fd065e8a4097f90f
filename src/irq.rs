//! IRQ records and the encoding of VFIO_DEVICE_SET_IRQS requests. Pure.

/// IRQ indices of a PCI device: fixed by vfio-pci.
pub const IRQ_INTX: u32 = 0;
pub const IRQ_MSI: u32 = 1;
pub const IRQ_MSIX: u32 = 2;
pub const IRQ_ERR: u32 = 3;
pub const IRQ_REQ: u32 = 4;

/// IRQ flags (the kernel's values, so they translate one to one).
pub const IRQ_EVENTFD: u32 = 1 << 0;
pub const IRQ_MASKABLE: u32 = 1 << 1;
pub const IRQ_AUTOMASKED: u32 = 1 << 2;
pub const IRQ_NORESIZE: u32 = 1 << 3;

/// One IRQ index of a device; record `i` describes irq index `i`. 32 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Irq {
    pub index: u32,
    /// `VFIOKIT_IRQ_{EVENTFD,MASKABLE,AUTOMASKED,NORESIZE}` flags.
    pub flags: u32,
    /// Number of vectors; 0 when the device has none of this kind.
    pub count: u32,
    pub reserved0: u32,
    pub reserved: [u64; 2],
}

const _: () = assert!(size_of::<Irq>() == 32 && std::mem::offset_of!(Irq, reserved) == 16);

pub(crate) fn record(index: u32, kernel_flags: u32, count: u32) -> Irq {
    let known = IRQ_EVENTFD | IRQ_MASKABLE | IRQ_AUTOMASKED | IRQ_NORESIZE;
    Irq { index, flags: kernel_flags & known, count, ..Default::default() }
}

/// What a SET_IRQS request does to the vectors it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Trigger,
    Mask,
    Unmask,
}

// linux/vfio.h
const DATA_NONE: u32 = 1 << 0;
const DATA_EVENTFD: u32 = 1 << 2;
const ACTION_MASK: u32 = 1 << 3;
const ACTION_UNMASK: u32 = 1 << 4;
const ACTION_TRIGGER: u32 = 1 << 5;
/// `struct vfio_irq_set` without its data: argsz, flags, index, start, count.
const SET_LEN: usize = 20;

/// A `struct vfio_irq_set` with no data: `action` on vectors `start..start+count`.
/// With `Trigger` and `count == 0` it disables the whole index. On the stack: it is on the
/// IRQ round-trip path.
#[inline]
pub(crate) fn encode_set(index: u32, start: u32, count: u32, action: Action) -> [u8; SET_LEN] {
    let flag = match action {
        Action::Trigger => ACTION_TRIGGER,
        Action::Mask => ACTION_MASK,
        Action::Unmask => ACTION_UNMASK,
    };
    let mut set = [0u8; SET_LEN];
    for (bytes, field) in
        set.chunks_exact_mut(4).zip([SET_LEN as u32, DATA_NONE | flag, index, start, count])
    {
        bytes.copy_from_slice(&field.to_ne_bytes());
    }
    set
}

/// A `struct vfio_irq_set` that routes vectors `start..start+fds.len()` to eventfds
/// (-1 detaches a vector).
pub(crate) fn encode_eventfds(index: u32, start: u32, fds: &[i32]) -> Vec<u8> {
    let mut set = encode_eventfds_header(index, start, fds.len() as u32).to_vec();
    set[..4].copy_from_slice(&((SET_LEN + 4 * fds.len()) as u32).to_ne_bytes());
    set.extend(fds.iter().flat_map(|fd| fd.to_ne_bytes()));
    set
}

/// The header of [`encode_eventfds`] alone: how vfio-user sends it, the fds going alongside.
pub(crate) fn encode_eventfds_header(index: u32, start: u32, count: u32) -> [u8; SET_LEN] {
    let mut set = encode_set(index, start, count, Action::Trigger);
    set[4..8].copy_from_slice(&(DATA_EVENTFD | ACTION_TRIGGER).to_ne_bytes());
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_bindings::bindings::vfio as k;

    fn words(v: &[u8]) -> Vec<u32> {
        v.chunks(4).map(|c| u32::from_ne_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn constants_match_the_kernel() {
        assert_eq!(k::VFIO_IRQ_SET_DATA_NONE, DATA_NONE);
        assert_eq!(k::VFIO_IRQ_SET_DATA_EVENTFD, DATA_EVENTFD);
        assert_eq!(k::VFIO_IRQ_SET_ACTION_MASK, ACTION_MASK);
        assert_eq!(k::VFIO_IRQ_SET_ACTION_UNMASK, ACTION_UNMASK);
        assert_eq!(k::VFIO_IRQ_SET_ACTION_TRIGGER, ACTION_TRIGGER);
        assert_eq!(size_of::<k::vfio_irq_set>(), SET_LEN);
        assert_eq!(k::VFIO_IRQ_INFO_NORESIZE, IRQ_NORESIZE);
        assert_eq!(k::VFIO_PCI_REQ_IRQ_INDEX, IRQ_REQ);
    }

    #[test]
    fn eventfd_set_carries_its_fds() {
        let v = encode_eventfds(IRQ_MSIX, 2, &[7, -1]);
        assert_eq!(words(&v), [28, DATA_EVENTFD | ACTION_TRIGGER, 2, 2, 2, 7, u32::MAX]);
    }

    #[test]
    fn disable_is_a_dataless_trigger_of_zero_vectors() {
        assert_eq!(
            words(&encode_set(IRQ_INTX, 0, 0, Action::Trigger)),
            [20, DATA_NONE | ACTION_TRIGGER, 0, 0, 0]
        );
        assert_eq!(
            words(&encode_set(IRQ_INTX, 0, 1, Action::Unmask))[1],
            DATA_NONE | ACTION_UNMASK
        );
    }

    #[test]
    fn unknown_kernel_flags_are_dropped() {
        assert_eq!(
            record(1, 0xff01, 4),
            Irq { index: 1, flags: IRQ_EVENTFD, count: 4, ..Default::default() }
        );
    }
}
