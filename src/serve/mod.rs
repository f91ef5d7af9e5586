//! `plankton serve`: the long-running daemon next to an imaging instrument. Sources (a watched
//! folder, HTTP uploads, a NATS JetStream consumer shared by a group of daemons) put every accepted image in a durable spool before acknowledging it;
//! the same decode -> warp -> ZMUV stages as replay feed a micro-batcher and the model; rows go
//! to rolling Parquet files, and an image leaves the spool only once its row is in a finished
//! file, so a crash loses nothing (at-least-once, idempotent by image id).

pub mod config;
pub mod daemon;
pub mod drift;
pub mod engine;
pub mod http;
pub mod nats;
pub mod results;
pub mod spool;
pub mod watch;

pub use daemon::{prometheus, run, ServeError, ServeEvent, ServeSummary};

/// Text from outside (a watched file's name, a client's file name) for a log line or the
/// `error` column: control characters escaped (`\n`, `\t`, `\u{1b}`...), everything else kept, so
/// one record stays one line.
pub fn one_line(text: impl std::fmt::Display) -> String {
    let text = text.to_string();
    // Control characters, and the Unicode line and paragraph separators some log viewers break on.
    let breaks = |c: char| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
    if !text.chars().any(breaks) {
        return text;
    }
    text.chars()
        .map(|c| match c {
            '\n' => "\\n".to_string(),
            '\t' => "\\t".to_string(),
            '\r' => "\\r".to_string(),
            c if breaks(c) => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_escapes_control_characters_only() {
        assert_eq!(
            super::one_line("bad\nname\t\u{1b}[31m.jpg"),
            "bad\\nname\\t\\u{1b}[31m.jpg"
        );
        assert_eq!(super::one_line("café ü.jpg"), "café ü.jpg");
        assert_eq!(super::one_line("a\u{2028}b\u{85}c"), "a\\u{2028}b\\u{85}c");
    }
}
