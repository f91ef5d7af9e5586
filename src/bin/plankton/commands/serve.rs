//! `plankton serve`: the camera-ingest daemon.

use super::prelude::*;

#[derive(Args)]
pub struct ServeArgs {
    /// The daemon config (see pipelines/camera-daemon.toml).
    #[arg(long)]
    pipeline: PathBuf,
}

pub async fn run(a: ServeArgs) -> Result<()> {
    use plankton::serve::{self, config::ServeConfig, ServeEvent};
    use std::io::Write;
    let cfg = ServeConfig::load(&a.pipeline)?;
    let reload = Arc::new(tokio::sync::Notify::new());
    let shutdown = stop_on_signals(Some(reload.clone()))?;
    let summary = serve::run(cfg, shutdown, reload, |e| {
        let line = match e {
            ServeEvent::Listening(addr) => format!("listening on http://{addr}"),
            ServeEvent::Ready { model_id, replayed } => {
                format!("ready: serving {model_id} ({replayed} spooled image(s) replayed)")
            }
        };
        println!("{line}");
        let _ = std::io::stdout().flush();
    })
    .await?;
    println!("stopped ({} replayed at start)", summary.replayed);
    Ok(())
}
