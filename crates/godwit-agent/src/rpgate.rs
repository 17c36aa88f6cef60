//! The destination's gate on QEMU's return path.
//!
//! QEMU's return path (destination → source) carries `be16 type, be16 len,
//! payload` messages (`qemu-migration-stream.md` §3). In precopy only two
//! occur: PONG (2) and SHUT (1). SHUT is the message that lets the source
//! QEMU complete and retire its copy of the guest, and the destination QEMU
//! sends it only after it started the guest.
//!
//! So whether SHUT left this host is *the* fact that decides where the VM
//! runs. The relay forwards SHUT only through [`ReturnGate::pass_shut`];
//! the failure path calls [`ReturnGate::fence`]. Whichever comes first
//! wins, under one lock: a fenced gate never lets SHUT out, and a SHUT that
//! went out means the destination must keep its VM. [`ReturnPathParser`]
//! splits the byte stream into messages; a message type it does not know
//! stops the relay before a byte of it is forwarded.

use std::sync::Mutex;

/// Return-path message type SHUT.
pub const MSG_SHUT: u16 = 1;
/// Return-path message type PONG.
pub const MSG_PONG: u16 = 2;
/// Message header length.
const HEADER: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateState {
    Open,
    Fenced,
    ShutPassed,
}

/// See the module docs.
#[derive(Debug)]
pub struct ReturnGate(Mutex<GateState>);

impl Default for ReturnGate {
    fn default() -> Self {
        Self(Mutex::new(GateState::Open))
    }
}

impl ReturnGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks to forward a SHUT; false if the gate was fenced first.
    pub fn pass_shut(&self) -> bool {
        let mut g = self.lock();
        match *g {
            GateState::Fenced => false,
            _ => {
                *g = GateState::ShutPassed;
                true
            }
        }
    }

    /// Closes the gate for good; returns true if a SHUT already passed
    /// (then the destination owns the VM and must keep it).
    pub fn fence(&self) -> bool {
        let mut g = self.lock();
        if *g == GateState::ShutPassed {
            return true;
        }
        *g = GateState::Fenced;
        false
    }

    /// Whether a SHUT has passed.
    pub fn shut_passed(&self) -> bool {
        *self.lock() == GateState::ShutPassed
    }
}

/// Errors parsing the return path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReturnPathError {
    /// A message type not used by precopy migration.
    #[error("unexpected return-path message type {0}")]
    UnknownType(u16),
}

/// One complete return-path message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnMessage {
    /// Message type.
    pub kind: u16,
    /// Header and payload, exactly as QEMU wrote them.
    pub bytes: Vec<u8>,
}

/// Splits the return path into messages (sans-IO).
#[derive(Debug, Default)]
pub struct ReturnPathParser {
    buf: Vec<u8>,
}

impl ReturnPathParser {
    /// Adds bytes read from QEMU.
    pub fn handle_input(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, if any.
    pub fn poll_message(&mut self) -> Result<Option<ReturnMessage>, ReturnPathError> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let kind = u16::from_be_bytes([self.buf[0], self.buf[1]]);
        if kind != MSG_SHUT && kind != MSG_PONG {
            return Err(ReturnPathError::UnknownType(kind));
        }
        let len = u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize;
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        let bytes: Vec<u8> = self.buf.drain(..HEADER + len).collect();
        Ok(Some(ReturnMessage { kind, bytes }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_pong_and_shut_across_chunks() {
        // PONG 1 then SHUT 0, as captured from QEMU 7.2.
        let wire = [0, 2, 0, 4, 0, 0, 0, 1, 0, 1, 0, 4, 0, 0, 0, 0];
        for cut in 0..wire.len() {
            let mut p = ReturnPathParser::default();
            let mut got = Vec::new();
            for chunk in [&wire[..cut], &wire[cut..]] {
                p.handle_input(chunk);
                while let Some(m) = p.poll_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got.len(), 2);
            assert_eq!(got[0].kind, MSG_PONG);
            assert_eq!(got[1].kind, MSG_SHUT);
            assert_eq!(
                got.iter().flat_map(|m| m.bytes.clone()).collect::<Vec<_>>(),
                wire
            );
        }
    }

    #[test]
    fn unknown_types_stop_the_stream() {
        let mut p = ReturnPathParser::default();
        p.handle_input(&[0, 5, 0, 1, 3]);
        assert_eq!(p.poll_message(), Err(ReturnPathError::UnknownType(5)));
    }

    #[test]
    fn gate_decides_once() {
        let g = ReturnGate::default();
        assert!(g.pass_shut());
        assert!(g.fence(), "a passed SHUT wins over a later fence");
        let g = ReturnGate::default();
        assert!(!g.fence());
        assert!(!g.pass_shut(), "a fenced gate never lets SHUT out");
        assert!(!g.shut_passed());
    }
}
