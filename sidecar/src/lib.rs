//! tidecache-sidecar: the `tidecached` daemon, one per host, that holds
//! every revision once for all worker processes.
//!
//! [`server`] serves the protocol of `tidecache_protocol` on a Unix
//! socket; [`startup`] holds the checks a start makes before it touches
//! any file, and the arena file's lock; [`metrics`] renders the counters
//! (`stats --format`, the Prometheus endpoint of [`scrape`]); [`clean`]
//! removes an arena file no sidecar uses; [`readiness`] tells a service
//! manager the sidecar is ready or stopping; [`timestamp`] reads tids as
//! times. `src/main.rs` is the command line (`serve`, `stats`, `check`,
//! `clean`).

#![warn(missing_docs)]

pub mod clean;
pub mod metrics;
pub mod readiness;
pub mod refusal;
pub mod scrape;
pub mod server;
pub mod startup;
pub mod timestamp;

pub use server::{Server, ServerConfig, SidecarError};
