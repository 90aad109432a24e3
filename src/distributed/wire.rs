//! A small byte encoding for what ranks gather from each other (per-pair metric values, reference
//! log-probs): float32 as their bits, so NaN and infinities travel unchanged.

use crate::{Error, Result};

/// Appends values to a byte buffer.
#[derive(Default)]
pub struct Writer {
    pub bytes: Vec<u8>,
}

impl Writer {
    pub fn u64(&mut self, v: u64) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f64(&mut self, v: f64) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f32s(&mut self, v: &[f32]) {
        self.u64(v.len() as u64);
        for x in v {
            self.bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    pub fn opt_strings(&mut self, v: &[Option<String>]) {
        self.u64(v.len() as u64);
        for s in v {
            match s {
                None => self.bytes.push(0),
                Some(s) => {
                    self.bytes.push(1);
                    self.u64(s.len() as u64);
                    self.bytes.extend_from_slice(s.as_bytes());
                }
            }
        }
    }
}

/// Reads back what a [`Writer`] wrote, in the same order.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.bytes.len() {
            return Err(Error::Distributed(format!("a rank sent a truncated message ({} bytes left, {n} expected)", self.bytes.len())));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn len(&mut self) -> Result<usize> {
        let n = self.u64()? as usize;
        // every element takes at least one byte: a corrupt length fails here, not in an allocation
        if n > self.bytes.len() {
            return Err(Error::Distributed(format!("a rank sent a message announcing {n} elements in {} bytes", self.bytes.len())));
        }
        Ok(n)
    }
    pub fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.len()?;
        Ok(self.take(4 * n)?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
    }
    pub fn opt_strings(&mut self) -> Result<Vec<Option<String>>> {
        let n = self.len()?;
        (0..n)
            .map(|_| match self.take(1)?[0] {
                0 => Ok(None),
                _ => {
                    let len = self.len()?;
                    String::from_utf8(self.take(len)?.to_vec()).map(Some).map_err(|_| Error::Distributed("a rank sent a string that is not UTF-8".into()))
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_bits() {
        let mut w = Writer::default();
        w.u64(7);
        w.f64(-0.5);
        w.f32s(&[1.5, f32::NAN, f32::NEG_INFINITY, -0.0]);
        w.opt_strings(&[None, Some("grüße".into()), Some(String::new())]);
        let mut r = Reader::new(&w.bytes);
        assert_eq!(r.u64().unwrap(), 7);
        assert_eq!(r.f64().unwrap(), -0.5);
        let f = r.f32s().unwrap();
        assert_eq!(
            f.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            [1.5f32, f32::NAN, f32::NEG_INFINITY, -0.0].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(r.opt_strings().unwrap(), vec![None, Some("grüße".into()), Some(String::new())]);
        assert!(r.u64().is_err(), "reading past the end is an error");
    }

    #[test]
    fn corrupt_length_is_an_error() {
        let mut w = Writer::default();
        w.u64(u64::MAX);
        assert!(Reader::new(&w.bytes).f32s().is_err());
    }
}
