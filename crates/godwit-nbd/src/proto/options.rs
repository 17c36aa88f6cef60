//! Parsing of option payloads (GO/INFO, LIST/SET_META_CONTEXT) in the
//! negotiation phase. Pure functions over a complete option's data; the
//! caller turns an [`OptionDataError`] into an `NBD_REP_ERR_*` reply, so a bad
//! option never desynchronises the stream.

use super::{BASE_ALLOCATION, MAX_STRING_LEN};

/// Why an option's data was refused (answered, not fatal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OptionDataError {
    /// Lengths inside the data do not add up, or a string is not UTF-8.
    Invalid(&'static str),
    /// A string is longer than [`MAX_STRING_LEN`].
    TooBig,
}

/// A cursor that refuses to read past the end instead of panicking.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionDataError> {
        if self.data.len() < n {
            return Err(OptionDataError::Invalid(
                "option data shorter than its fields",
            ));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, OptionDataError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, OptionDataError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A 32-bit length followed by a UTF-8 string of that length.
    fn string(&mut self) -> Result<String, OptionDataError> {
        let len = self.u32()?;
        if len > MAX_STRING_LEN {
            return Err(OptionDataError::TooBig);
        }
        // `len` <= MAX_STRING_LEN, so the cast cannot truncate.
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| OptionDataError::Invalid("string is not UTF-8"))
    }

    fn finish(&self) -> Result<(), OptionDataError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(OptionDataError::Invalid("trailing bytes after option data"))
        }
    }
}

/// Data of NBD_OPT_GO / NBD_OPT_INFO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GoData {
    pub(crate) name: String,
    pub(crate) info_requests: Vec<u16>,
}

pub(crate) fn parse_go(data: &[u8]) -> Result<GoData, OptionDataError> {
    let mut c = Cursor { data };
    let name = c.string()?;
    let n = c.u16()?;
    let mut info_requests = Vec::with_capacity(usize::from(n).min(16));
    for _ in 0..n {
        info_requests.push(c.u16()?);
    }
    c.finish()?;
    Ok(GoData {
        name,
        info_requests,
    })
}

/// Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MetaData {
    pub(crate) name: String,
    pub(crate) queries: Vec<String>,
}

pub(crate) fn parse_meta(data: &[u8]) -> Result<MetaData, OptionDataError> {
    let mut c = Cursor { data };
    let name = c.string()?;
    let n = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        // Each query needs at least its 4-byte length, so `n` is bounded by
        // the (bounded) option length: the loop ends on a short read.
        queries.push(c.string()?);
    }
    c.finish()?;
    Ok(MetaData { name, queries })
}

/// Whether a LIST_META_CONTEXT query matches `base:allocation`.
/// `base:` is the namespace wildcard, allowed only when listing.
pub(crate) fn list_query_matches(query: &str) -> bool {
    query == BASE_ALLOCATION || query == "base:"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go_bytes(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    #[test]
    fn go_roundtrip() {
        let g = parse_go(&go_bytes(b"disk0", &[3, 2])).unwrap();
        assert_eq!(g.name, "disk0");
        assert_eq!(g.info_requests, vec![3, 2]);
    }

    #[test]
    fn go_rejects_short_long_and_trailing() {
        let mut v = go_bytes(b"disk0", &[3]);
        assert!(parse_go(&v[..v.len() - 1]).is_err());
        v.push(0);
        assert!(parse_go(&v).is_err());
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_go(&huge), Err(OptionDataError::TooBig));
        assert!(parse_go(&go_bytes(&[0xff, 0xfe], &[])).is_err());
    }

    #[test]
    fn meta_parses_queries_and_bounds_count() {
        let mut v = Vec::new();
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&2u32.to_be_bytes());
        for q in [&b"base:allocation"[..], b"qemu:dirty-bitmap:x"] {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q);
        }
        let m = parse_meta(&v).unwrap();
        assert_eq!(m.name, "");
        assert_eq!(m.queries, vec!["base:allocation", "qemu:dirty-bitmap:x"]);
        // A huge query count with no data fails fast instead of looping.
        let mut bad = vec![0, 0, 0, 0];
        bad.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta(&bad).is_err());
    }
}
