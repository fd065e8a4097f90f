//! SR-IOV's VF token: the UUID a PF's user shares with its VFs' users (vfio-pci with
//! `enable_sriov=1`). Pure parsing and formatting; the kernel calls are in `sys`.

use std::fmt;
use std::str::FromStr;

/// A VF token: 16 bytes, written as the usual 8-4-4-4-12 hex UUID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VfToken(pub [u8; 16]);

impl FromStr for VfToken {
    type Err = String;

    /// "bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3" (either case); anything else is refused, saying
    /// what a token looks like.
    fn from_str(s: &str) -> Result<VfToken, String> {
        let bad = || {
            format!(
                "{s:?} is not a VF token: expected a UUID, 32 hex digits as 8-4-4-4-12 \
                 (bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3)"
            )
        };
        let groups: Vec<&str> = s.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lens != [8, 4, 4, 4, 12]
            || !groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(bad());
        }
        let hex: String = groups.concat();
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(VfToken(bytes))
    }
}

impl fmt::Display for VfToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for VfToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VfToken({self})")
    }
}

/// An enabled VF, as `vfiokit_pci_sriov_set_numvfs` lists it: the C API's `vfiokit_vf`, 32
/// bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vf {
    /// Its canonical PCI address, NUL-terminated.
    pub address: [std::ffi::c_char; 16],
    /// Its VF number (the PF's `virtfnN`).
    pub index: u32,
    pub reserved0: u32,
    pub reserved: [u64; 1],
}

const _: () = assert!(size_of::<Vf>() == 32);

impl Vf {
    pub fn address(&self) -> &str {
        crate::text::text(&self.address)
    }
}

/// The records of VFs listed in VF order.
pub(crate) fn records(addresses: &[String]) -> Vec<Vf> {
    addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut vf = Vf { address: [0; 16], index: i as u32, reserved0: 0, reserved: [0] };
            crate::text::fill(&mut vf.address, a);
            vf
        })
        .collect()
}

/// The name VFIO_GROUP_GET_DEVICE_FD takes for a VF (or a PF with VFs in use) on type1:
/// "ADDR vf_token=UUID".
pub(crate) fn group_device_name(address: &str, token: Option<&VfToken>) -> String {
    match token {
        Some(t) => format!("{address} vf_token={t}"),
        None => address.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_round_trip() {
        let text = "bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3";
        let t: VfToken = text.parse().unwrap();
        assert_eq!(t.0[0], 0xbd);
        assert_eq!(t.0[15], 0xf3);
        assert_eq!(t.to_string(), text);
        let upper: VfToken = text.to_uppercase().parse().unwrap();
        assert_eq!(upper, t);
    }

    #[test]
    fn refuses_what_is_not_a_uuid() {
        for bad in [
            "",
            "bd8d9d2b5a5f4f5aa211f591514ba1f3",
            "bd8d9d2b-5a5f-4f5a-a211-f591514ba1f",
            "bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3-",
            "gd8d9d2b-5a5f-4f5a-a211-f591514ba1f3",
            "bd8d9d2b-5a5f-4f5a-a211+f591514ba1f3",
            "+d8d9d2b-5a5f-4f5a-a211-f591514ba1f3",
            "bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3 ",
        ] {
            let e = bad.parse::<VfToken>().unwrap_err();
            assert!(e.contains("not a VF token"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn group_name_carries_the_token() {
        let t: VfToken = "00000000-0000-0000-0000-000000000001".parse().unwrap();
        assert_eq!(
            group_device_name("0000:03:00.1", Some(&t)),
            "0000:03:00.1 vf_token=00000000-0000-0000-0000-000000000001"
        );
        assert_eq!(group_device_name("0000:03:00.1", None), "0000:03:00.1");
    }
}
