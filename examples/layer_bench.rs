//! Prints the layer benchmarks at the seed's shape as JSON (`lora bench` runs the full set).
fn main() -> lora::Result<()> {
    let r = lora::app::bench::layer_bench(15)?;
    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    Ok(())
}
