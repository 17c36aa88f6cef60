//! LEB128 varints and a bounds-checked reader over untrusted bytes.

use bytes::{BufMut, Bytes};

use crate::CodecError;

/// Appends `v` as an unsigned LEB128 varint.
pub fn put(out: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// Reads fields from a message, failing cleanly at its end.
#[derive(Debug)]
pub struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `b`.
    pub fn new(b: &'a [u8]) -> Self {
        Reader { b, at: 0 }
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.b.len() - self.at
    }

    /// Position from the start.
    pub fn position(&self) -> usize {
        self.at
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, CodecError> {
        let v = *self.b.get(self.at).ok_or(CodecError::Truncated)?;
        self.at += 1;
        Ok(v)
    }

    /// A varint of at most 64 bits.
    pub fn varint(&mut self) -> Result<u64, CodecError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            v |= u64::from(byte & 0x7f)
                .checked_shl(shift)
                .ok_or(CodecError::Malformed("varint overflows"))?;
            if byte & 0x80 == 0 {
                if shift == 63 && byte > 1 {
                    return Err(CodecError::Malformed("varint overflows"));
                }
                return Ok(v);
            }
        }
        Err(CodecError::Malformed("varint too long"))
    }

    /// A varint that must fit `max`.
    pub fn varint_max(&mut self, max: u64, what: &'static str) -> Result<u64, CodecError> {
        let v = self.varint()?;
        if v > max {
            return Err(CodecError::Malformed(what));
        }
        Ok(v)
    }

    /// `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.at.checked_add(n).ok_or(CodecError::Truncated)?;
        let s = self.b.get(self.at..end).ok_or(CodecError::Truncated)?;
        self.at = end;
        Ok(s)
    }

    /// `n` bytes as a shared slice of `whole` (which `self` reads).
    pub fn bytes_of(&mut self, whole: &Bytes, n: usize) -> Result<Bytes, CodecError> {
        let start = self.at;
        self.bytes(n)?;
        Ok(whole.slice(start..start + n))
    }

    /// A fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varints_roundtrip(v: u64) {
            let mut b = Vec::new();
            put(&mut b, v);
            let mut r = Reader::new(&b);
            prop_assert_eq!(r.varint().unwrap(), v);
            prop_assert_eq!(r.remaining(), 0);
        }

        #[test]
        fn reader_never_panics(b: Vec<u8>) {
            let mut r = Reader::new(&b);
            while r.varint().is_ok() {}
        }
    }

    #[test]
    fn rejects_overlong() {
        let b = [0xffu8; 11];
        assert!(Reader::new(&b).varint().is_err());
        let b = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(Reader::new(&b).varint().is_err());
    }
}
