//! Sinks: what the pipeline writes for people and downstream tools.
pub mod font5x7;
pub mod parquet;
pub mod plot;
pub mod preview;
pub mod report;
pub mod submission;

/// Moves a finished file written under a temporary name into place so that it survives a power
/// loss, not only a crash: the file's data is flushed (fsync), then renamed, then the folder is
/// flushed. The daemon releases images from its spool right after, so without the first and
/// last steps a power cut could lose rows whose images were already released.
pub fn durable_rename(tmp: &std::path::Path, dest: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, dest)?;
    #[cfg(unix)]
    if let Some(dir) = dest.parent() {
        let dir = if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
