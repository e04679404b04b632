//! Per-op time of an ONNX model in tract: `cargo run --release --example profile_tract -- MODEL.onnx`.
use std::collections::HashMap;
use std::time::Instant;
use tract_onnx::prelude::*;

fn main() -> TractResult<()> {
    let path = std::env::args().nth(1).expect("model path");
    let threads: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let batch: usize = std::env::args()
        .nth(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    scout::backbone::set_threads(threads);
    let model = tract_onnx::onnx()
        .model_for_path(&path)?
        .with_input_fact(0, f32::fact([batch, 3, 256, 256]).into())?
        .into_optimized()?;
    let plan = model.into_runnable()?;
    let input: TValue = Tensor::from(tract_ndarray::Array4::<f32>::from_elem(
        (batch, 3, 256, 256),
        0.3,
    ))
    .into();
    let mut state = tract_core::plan::SimpleState::new(&plan)?;
    state.run(tvec!(input.clone()))?;
    let mut per_op: HashMap<String, (f64, usize)> = HashMap::new();
    let t0 = Instant::now();
    for _ in 0..3 {
        state.run_plan_with_eval(tvec!(input.clone()), |ctx, st, node, inputs| {
            let t = Instant::now();
            let r = tract_core::plan::eval(ctx, st, node, inputs);
            let key = if std::env::var_os("PER_NODE").is_some() {
                format!(
                    "{} {} {:?}",
                    node.op.name(),
                    node.name,
                    node.outputs[0].fact.shape
                )
            } else {
                node.op.name().to_string()
            };
            let e = per_op.entry(key).or_default();
            e.0 += t.elapsed().as_secs_f64() * 1000.0 / 3.0;
            e.1 += 1;
            r
        })?;
    }
    let total = t0.elapsed().as_secs_f64() * 1000.0 / 3.0;
    let mut v: Vec<_> = per_op.into_iter().collect();
    v.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    println!(
        "total {total:.0} ms for batch {batch}: {:.0} ms/slice",
        total / batch as f64
    );
    for (name, (ms, n)) in v.iter().take(25) {
        println!("{ms:8.1} ms {:5} nodes  {name}", n / 3);
    }
    Ok(())
}
