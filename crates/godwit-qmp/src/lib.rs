//! QMP (QEMU Machine Protocol) for godwit.
//!
//! # Layout
//!
//! - [`codec`]: the sans-IO connection core ([`QmpConnection`]): bytes in,
//!   typed greetings, replies and events out; commands in, bytes out.
//! - [`commands`]: typed commands and replies ([`QmpCommand`]) for what
//!   godwit drives: status, migration control and monitoring, machine types.
//! - `client` (feature `tokio`, on by default): [`QmpClient`], a cloneable
//!   async handle multiplexing commands from many tasks over one unix
//!   socket, with events on a broadcast channel.
#![warn(missing_docs)]

pub mod codec;
pub mod commands;

#[cfg(feature = "tokio")]
mod client;

#[cfg(feature = "tokio")]
pub use client::{QmpClient, QmpError, EVENT_CHANNEL_CAPACITY, HANDSHAKE_TIMEOUT};
pub use codec::{
    CodecError, ErrorReply, Greeting, QmpConnection, QmpEvent, QmpOutput, Timestamp, MAX_LINE_LEN,
};
pub use commands::QmpCommand;
