//! What several integration tests share: the tiny network they train.

/// A tiny cyclic convroll4 on 23x23 patches (milliseconds per step on a CPU): the header of a
/// pipeline TOML up to and including `[model]`; the caller appends `[train]` and the rest.
/// `width` scales the channels, so two members of an ensemble can differ.
pub fn tiny_net_toml(name: &str, seed: u64, width: f64) -> String {
    format!(
        r#"name = "{name}"
seed = {seed}
[[patch]]
rows = 23
cols = 23
target = 20.0
[zmuv]
samples = 128
[batch]
size = 8
[model]
preset = "convroll4"
width = {width}
dense_units = 32
"#
    )
}
