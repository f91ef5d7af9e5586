//! `plankton serve`: the long-running daemon next to an imaging instrument. Sources (a watched
//! folder, HTTP uploads) put every accepted image in a durable spool before acknowledging it;
//! the same decode -> warp -> ZMUV stages as replay feed a micro-batcher and the model; rows go
//! to rolling Parquet files, and an image leaves the spool only once its row is in a finished
//! file, so a crash loses nothing (at-least-once, idempotent by image id).

pub mod config;
pub mod daemon;
pub mod engine;
pub mod http;
pub mod results;
pub mod spool;
pub mod watch;

pub use daemon::{prometheus, run, ServeError, ServeEvent, ServeSummary};
