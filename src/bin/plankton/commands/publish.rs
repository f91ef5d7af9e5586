//! `plankton publish`: images into a NATS JetStream stream (backfill, replay of a cruise).

use super::prelude::*;
use plankton::publish::{self, PublishOptions};
use plankton::serve::config::NatsConfig;

#[derive(Args)]
pub struct PublishArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, default_value = "nats://127.0.0.1:4222", value_delimiter = ',')]
    nats: Vec<String>,
    /// The subject to publish on (the stream's subjects must cover it).
    #[arg(long)]
    subject: String,
    /// The JetStream stream; created (file storage) with `--subject` as its subject when missing.
    #[arg(long, default_value = "PLANKTON")]
    stream: String,
    /// Fail instead of creating a missing stream.
    #[arg(long)]
    no_create_stream: bool,
    /// A file holding the NATS token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// A NATS credentials (.creds) file.
    #[arg(long)]
    credentials_file: Option<PathBuf>,
    /// Require TLS; CA certificates (PEM) to trust with --ca-file.
    #[arg(long)]
    tls: bool,
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Publish each file's absolute path (header Plankton-Ref) instead of its bytes: for images
    /// on storage the daemons share (their nats.reference_dirs), or larger than max_payload.
    #[arg(long)]
    reference: bool,
    /// The camera or instrument (header Plankton-Source; rows' source_path).
    #[arg(long)]
    source: Option<String>,
    /// Put before every image id (ids are otherwise the paths under the folder given, so two
    /// folders holding a file of one name need their own prefixes).
    #[arg(long, default_value = "")]
    id_prefix: String,
    /// Publishes awaiting their JetStream ack at most.
    #[arg(long, default_value_t = 256, value_parser = super::positive)]
    in_flight: usize,
    /// Attempts per message before it is reported as failed.
    #[arg(long, default_value_t = 5, value_parser = super::positive)]
    attempts: usize,
    /// Image files, or folders (searched recursively; ids are paths relative to the folder).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

pub async fn run(a: PublishArgs) -> Result<()> {
    let nats = NatsConfig {
        enabled: true,
        servers: a.nats.clone(),
        token_file: a.token_file.clone(),
        credentials_file: a.credentials_file.clone(),
        tls: a.tls,
        ca_file: a.ca_file.clone(),
        stream: a.stream.clone(),
        subjects: vec![a.subject.clone()],
        create_stream: !a.no_create_stream,
        ..NatsConfig::default()
    };
    if a.subject.is_empty()
        || a.subject
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '*' | '>'))
    {
        bail!(
            "--subject `{}`: a concrete subject (no wildcards or spaces), e.g. plankton.images.cam1",
            a.subject
        );
    }
    let items = publish::list_inputs(&a.inputs, &a.id_prefix).map_err(anyhow::Error::msg)?;
    if items.is_empty() {
        bail!(
            "no files under {}",
            a.inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let opts = PublishOptions {
        nats,
        subject: a.subject.clone(),
        inputs: a.inputs.clone(),
        reference: a.reference,
        source: a.source.clone(),
        in_flight: a.in_flight,
        attempts: a.attempts as u32,
    };
    let bar = progress(items.len() as u64, "published");
    let t0 = std::time::Instant::now();
    let summary = publish::publish(&opts, items, |done, _| bar.set_position(done)).await?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "published {} message(s) ({} duplicate(s) already in the stream, {:.1} MB) to {} in {:.1} s ({:.0}/s); stream sequences {}..{}",
        summary.published,
        summary.duplicates,
        summary.bytes as f64 / 1e6,
        a.subject,
        secs,
        (summary.published + summary.duplicates) as f64 / secs.max(1e-9),
        summary.first_seq.map_or("-".into(), |s| s.to_string()),
        summary.last_seq.map_or("-".into(), |s| s.to_string()),
    );
    if !summary.failed.is_empty() {
        for (path, reason) in &summary.failed {
            eprintln!("not published: {}: {reason}", path.display());
        }
        bail!(
            "{} file(s) not published (listed above)",
            summary.failed.len()
        );
    }
    Ok(())
}
