//! Interface names and indexes in the calling thread's netns.

use std::ffi::CString;

use super::NetnsError;

/// Name of the interface with `ifindex`.
pub fn name_of(ifindex: u32) -> Result<String, NetnsError> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    #[allow(unsafe_code)]
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(NetnsError::NoInterface(format!("#{ifindex}")));
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Index of the interface `name`.
pub fn index_of(name: &str) -> Result<u32, NetnsError> {
    let c = CString::new(name).map_err(|_| NetnsError::NoInterface(name.to_string()))?;
    // SAFETY: c is a valid NUL-terminated string.
    #[allow(unsafe_code)]
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(NetnsError::NoInterface(name.to_string()));
    }
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_round_trips() {
        let i = index_of("lo").expect("every netns has lo");
        assert_eq!(name_of(i).unwrap(), "lo");
        assert!(matches!(
            index_of("no-such-if0"),
            Err(NetnsError::NoInterface(_))
        ));
        assert!(index_of("bad\0name").is_err());
    }
}
