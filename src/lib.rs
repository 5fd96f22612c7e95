//! backfilld: runs data backfills against production PostgreSQL in the background, as
//! keyset-paginated, throttled, checkpointed batches claimed from `backfill.jobs` under a lease.
//! See ARCHITECTURE.md for the map and the invariants.
#![forbid(unsafe_code)]

pub mod app;
pub mod archive;
pub mod batch;
pub mod bloat;
pub mod cascade;
pub mod change;
pub mod check;
pub mod claim;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod db;
pub mod error;
pub mod fragment;
pub mod fullscan;
pub mod hidden;
pub mod http;
pub mod idempotency;
pub mod job;
pub mod keyset;
pub mod listen;
pub mod metrics;
pub mod ops;
pub mod pin;
pub mod plan;
pub mod runner;
pub mod schema;
pub mod shutdown;
pub mod sql;
pub mod staging;
pub mod target;
pub mod telemetry;
pub mod throttle;
pub mod validate;

pub use error::{Error, JobError, Result};
