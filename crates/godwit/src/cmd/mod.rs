//! Subcommand implementations, one module per area.

pub mod agent;
pub mod demo;
pub mod evacuate;
pub mod lab;
pub mod migrate;
pub mod vm;
