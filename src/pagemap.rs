//! /proc/self/pagemap entries, decoded into the physical address a device without an IOMMU
//! must be given for a buffer (no-IOMMU contexts). Pure.

/// Why a buffer cannot be handed to a device by its physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PagemapError {
    /// Not a whole number of 8-byte entries, or none.
    Truncated,
    /// Page `page` (counting from 0) is not in memory.
    NotPresent { page: usize },
    /// The kernel shows the pages but not their frames: reading those needs CAP_SYS_ADMIN.
    Hidden,
    /// Page `page` does not follow the page before it in physical memory.
    NotContiguous { page: usize },
}

impl std::fmt::Display for PagemapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PagemapError::Truncated => write!(f, "the pagemap read was cut short"),
            PagemapError::NotPresent { page } => write!(f, "page {page} is not in memory"),
            PagemapError::Hidden => write!(
                f,
                "/proc/self/pagemap hides physical frames from processes without CAP_SYS_ADMIN"
            ),
            PagemapError::NotContiguous { page } => write!(
                f,
                "the memory is not physically contiguous (page {page} does not follow page {})",
                page - 1
            ),
        }
    }
}

const PRESENT: u64 = 1 << 63;
/// Bits 0-54: the page frame number of a present page.
const PFN: u64 = (1 << 55) - 1;

/// The physical address of the first of the pages whose pagemap entries are `entries`, if
/// every page is present and each follows the one before it in physical memory.
pub(crate) fn contiguous_physical(entries: &[u8], page_size: u64) -> Result<u64, PagemapError> {
    if entries.is_empty() || entries.len() % 8 != 0 {
        return Err(PagemapError::Truncated);
    }
    let mut first = None;
    for (page, raw) in entries.chunks_exact(8).enumerate() {
        let entry = u64::from_ne_bytes(raw.try_into().expect("chunks of 8"));
        if entry & PRESENT == 0 {
            return Err(PagemapError::NotPresent { page });
        }
        let pfn = entry & PFN;
        if pfn == 0 {
            return Err(PagemapError::Hidden);
        }
        let start = *first.get_or_insert(pfn);
        if pfn != start + page as u64 {
            return Err(PagemapError::NotContiguous { page });
        }
    }
    Ok(first.expect("at least one entry") * page_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{PAGEMAP_HUGE_2M, PAGEMAP_SMALL_PAGES, PAGEMAP_UNPRIVILEGED};

    const PAGE: u64 = 4096;

    #[test]
    fn a_hugepage_is_contiguous() {
        assert_eq!(contiguous_physical(PAGEMAP_HUGE_2M, PAGE), Ok(0x7a00 * PAGE));
        assert_eq!(0x7a00 * PAGE % (2 << 20), 0, "a 2 MiB page starts 2 MiB-aligned");
    }

    #[test]
    fn small_pages_with_consecutive_frames() {
        assert_eq!(contiguous_physical(PAGEMAP_SMALL_PAGES, PAGE), Ok(0x72fc * PAGE));
        assert_eq!(contiguous_physical(&PAGEMAP_SMALL_PAGES[8..16], PAGE), Ok(0x72fd * PAGE));
    }

    #[test]
    fn frames_hidden_from_the_unprivileged() {
        assert_eq!(contiguous_physical(PAGEMAP_UNPRIVILEGED, PAGE), Err(PagemapError::Hidden));
    }

    #[test]
    fn corrupted_copies() {
        assert_eq!(contiguous_physical(&[], PAGE), Err(PagemapError::Truncated));
        assert_eq!(contiguous_physical(&PAGEMAP_HUGE_2M[..12], PAGE), Err(PagemapError::Truncated));
        // The present bit cleared on the third page.
        let mut absent = PAGEMAP_HUGE_2M[..32].to_vec();
        absent[2 * 8 + 7] &= 0x7f;
        assert_eq!(contiguous_physical(&absent, PAGE), Err(PagemapError::NotPresent { page: 2 }));
        // Two pages swapped.
        let mut swapped = PAGEMAP_HUGE_2M[..32].to_vec();
        swapped[8..24].rotate_left(8);
        assert_eq!(
            contiguous_physical(&swapped, PAGE),
            Err(PagemapError::NotContiguous { page: 1 })
        );
    }
}
