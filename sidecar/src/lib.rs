//! tidecache-sidecar: the `tidecached` daemon, one per host, that holds
//! every revision once for all worker processes.
//!
//! [`server`] serves the protocol of `tidecache_protocol` on a Unix
//! socket; [`startup`] holds the checks a start makes before it touches
//! any file, and the arena file's lock; `src/main.rs` is the command line (`serve`, `stats`).

#![warn(missing_docs)]

pub mod refusal;
pub mod server;
pub mod startup;

pub use server::{Server, ServerConfig, SidecarError};
