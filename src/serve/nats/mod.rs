//! NATS JetStream, the distributed engine the daemons scale out on: several `plankton serve`
//! share one durable pull consumer of a stream of images ([`consumer`]), and `plankton publish`
//! fills the stream (`crate::publish`). This module holds what both sides share: the connection
//! (URLs, credentials, TLS), the stream, and the message headers.
//!
//! A message is one image: its bytes as the payload, or an empty payload with a `Plankton-Ref`
//! header naming a file on shared storage. Headers:
//!
//! | header | |
//! |---|---|
//! | `Plankton-Id` | the image id (rows' `image_id`); else `Nats-Msg-Id`; else `<stream>-<sequence>` |
//! | `Nats-Msg-Id` | set by `plankton publish` to the id: JetStream drops a re-publish within its duplicate window |
//! | `Plankton-Source` | the camera or instrument (rows' `source_path`); else `nats:<subject>` |
//! | `Plankton-Name` | the original file name, for the record |
//! | `Plankton-Captured` | capture time: RFC 3339 (`2026-12-04T21:00:00.250Z`) or Unix milliseconds |
//! | `Plankton-Ref` | a path to read the image from (only inside the daemon's `reference_dirs`) |

mod consumer;

pub use consumer::*;

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;

use super::config::NatsConfig;

pub const HEADER_ID: &str = "Plankton-Id";
pub const HEADER_SOURCE: &str = "Plankton-Source";
pub const HEADER_NAME: &str = "Plankton-Name";
pub const HEADER_CAPTURED: &str = "Plankton-Captured";
pub const HEADER_REF: &str = "Plankton-Ref";

pub const RECONNECTS: &str = "plankton_nats_reconnects_total";
pub const CONNECTED: &str = "plankton_nats_connected";

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("{path}: {message}")]
    Secret { path: PathBuf, message: String },
    #[error("cannot connect to NATS at {servers}: {message}")]
    Connect { servers: String, message: String },
    #[error("JetStream stream `{stream}`: {message}")]
    Stream { stream: String, message: String },
    #[error("JetStream consumer `{consumer}` of stream `{stream}`: {message}")]
    Consumer {
        stream: String,
        consumer: String,
        message: String,
    },
}

/// One line of a secret file (token, password), without surrounding white space.
fn read_secret(path: &std::path::Path, what: &str) -> Result<String, NatsError> {
    let err = |message: String| NatsError::Secret {
        path: path.to_path_buf(),
        message,
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| err(format!("cannot read the {what}: {e}")))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(err(format!("the {what} file is empty")));
    }
    Ok(secret.to_string())
}

/// Connects with the config's credentials and TLS settings. `wait`: fail if no server answers
/// (a command such as `publish`); otherwise the client keeps trying in the background and the
/// caller retries its JetStream calls (a daemon started before its server). Reconnects after a
/// lost connection are the client's, without end; each is counted.
pub async fn connect(
    cfg: &NatsConfig,
    name: &str,
    wait: bool,
) -> Result<async_nats::Client, NatsError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => {
                    metrics::gauge!(CONNECTED).set(1.0);
                    tracing::info!("nats: connected");
                }
                async_nats::Event::Disconnected => {
                    metrics::gauge!(CONNECTED).set(0.0);
                    metrics::counter!(RECONNECTS).increment(1);
                    tracing::warn!("nats: disconnected; reconnecting");
                }
                // A connection closed by us (the end of `publish`, a drained daemon).
                async_nats::Event::Closed => tracing::debug!("nats: connection closed"),
                other => tracing::warn!(event = %other, "nats"),
            }
        });
    if !wait {
        opts = opts.retry_on_initial_connect();
    }
    if let Some(p) = &cfg.token_file {
        opts = opts.token(read_secret(p, "NATS token")?);
    }
    if let (Some(user), Some(p)) = (&cfg.user, &cfg.password_file) {
        opts = opts.user_and_password(user.clone(), read_secret(p, "NATS password")?);
    }
    if let Some(p) = &cfg.credentials_file {
        opts = opts
            .credentials_file(p)
            .await
            .map_err(|e| NatsError::Secret {
                path: p.clone(),
                message: format!("cannot read the NATS credentials: {e}"),
            })?;
    }
    // A CA or a client certificate means TLS: required, not silently unused on a plain server.
    if cfg.tls || cfg.ca_file.is_some() || cfg.client_cert.is_some() {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &cfg.ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.client_cert, &cfg.client_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    let servers = cfg.servers.join(",");
    let addrs: Vec<async_nats::ServerAddr> = cfg
        .servers
        .iter()
        .map(|s| {
            s.parse().map_err(|e| NatsError::Connect {
                servers: servers.clone(),
                message: format!("`{s}` is not a server URL: {e}"),
            })
        })
        .collect::<Result<_, _>>()?;
    opts.connect(addrs).await.map_err(|e| NatsError::Connect {
        servers,
        message: e.to_string(),
    })
}

/// The stream, created (file storage, limits retention) when missing and `cfg.create_stream`.
pub async fn stream(
    js: &jetstream::Context,
    cfg: &NatsConfig,
) -> Result<jetstream::stream::Stream, NatsError> {
    let err = |message: String| NatsError::Stream {
        stream: cfg.stream.clone(),
        message,
    };
    if cfg.create_stream {
        js.get_or_create_stream(jetstream::stream::Config {
            name: cfg.stream.clone(),
            subjects: cfg.subjects.clone(),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| err(e.to_string()))
    } else {
        js.get_stream(&cfg.stream)
            .await
            .map_err(|e| {
                err(format!(
                    "{e} (create it first, or let plankton create it: nats.create_stream = true in a daemon config, no --no-create-stream for publish)"
                ))
            })
    }
}

/// Unix milliseconds from a `Plankton-Captured` value: RFC 3339 or an integer of milliseconds,
/// between 1973-03-03 and 9999-12-31 (a smaller integer is most likely seconds, refused rather
/// than read as a date in January 1970).
pub fn parse_captured(text: &str) -> Option<u64> {
    const EARLIEST_MS: u64 = 100_000_000_000;
    const LATEST_MS: u64 = 253_402_300_799_999;
    let text = text.trim();
    let ms = match text.parse::<u64>() {
        Ok(ms) => ms,
        Err(_) => {
            let t =
                time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                    .ok()?;
            u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()?
        }
    };
    (EARLIEST_MS..=LATEST_MS).contains(&ms).then_some(ms)
}

#[cfg(test)]
mod tests {
    use super::parse_captured;

    #[test]
    fn capture_times_in_rfc3339_or_unix_milliseconds() {
        assert_eq!(parse_captured("1764882000250"), Some(1_764_882_000_250));
        assert_eq!(
            parse_captured("2025-12-04T21:00:00.250Z"),
            Some(1_764_882_000_250)
        );
        assert_eq!(
            parse_captured("2025-12-04T22:00:00.250+01:00"),
            Some(1_764_882_000_250)
        );
        assert_eq!(parse_captured("yesterday"), None);
        assert_eq!(
            parse_captured("1764882000"),
            None,
            "seconds, not milliseconds"
        );
        assert_eq!(parse_captured("18446744073709551615"), None);
        assert_eq!(parse_captured("9223372036854775808"), None);
        assert_eq!(parse_captured("1969-12-31T23:59:59Z"), None, "before 1970");
    }
}
