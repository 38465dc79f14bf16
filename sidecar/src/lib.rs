//! tidecache-sidecar: the `tidecached` daemon, one per host, that holds
//! every revision once for all worker processes.
//!
//! [`server`] serves the protocol of `tidecache_protocol` on a Unix
//! socket; `src/main.rs` is the command line (`serve`, `stats`).

#![warn(missing_docs)]

pub mod server;

pub use server::{Server, ServerConfig, SidecarError};
