//! `plankton devices`: libtorch, CUDA and what `auto` picks.

use super::prelude::*;

#[derive(Args)]
pub struct DevicesArgs {
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: DevicesArgs) -> Result<()> {
    let r = plankton::device::cuda_report();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", r.render());
    }
    Ok(())
}
