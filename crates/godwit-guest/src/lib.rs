//! godwit-guest: the measuring instrument that runs inside test guests.
//!
//! A statically linked program (see `scripts/build-guest.sh`) shipped in
//! the test image by `godwit-image`. It loads the guest in ways a live
//! migration must preserve (dirty memory with verifiable content, real
//! page-cache and heap data, block I/O, UDP and TCP flows) and reports what
//! it sees to the host over a virtio-serial port, as JSON lines.
//!
//! The host agent depends on this library only for [`proto`], the message
//! types; the rest is the guest side.
//!
//! # Layout
//!
//! * [`proto`]: host<->guest messages and line codec (no I/O).
//! * [`pagegen`]: verifiable page/block content generator and checker.
//! * [`memdirty`]: dirty memory at a set rate; verify every page.
//! * [`realistic`]: page cache and anonymous memory from real files.
//! * [`diskio`]: block I/O with verifiable blocks and throughput samples.
//! * [`net`]: UDP stream analysis and a TCP echo pair.
//! * [`serve`]: runs commands as jobs, reports through a channel.
//! * [`port`]: the virtio-serial (or stdio) transport of the serve loop,
//!   resilient to the host disconnecting at every migration.
//! * [`sys`]: clocks, `/proc` figures, an owned anonymous mapping.
//!
//! Logging: the guest has no log collector, so diagnostics go to stderr
//! (the serial console) with a `godwit-guest:` prefix; everything the host
//! needs travels as reports.

#![warn(missing_docs)]

pub mod diskio;
pub mod memdirty;
pub mod net;
pub mod pagegen;
pub mod port;
pub mod proto;
pub mod realistic;
pub mod serve;
pub mod sys;
