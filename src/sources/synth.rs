//! Synthetic plankton generator (placeholder, being written).
