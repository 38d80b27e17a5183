//! Global gradient-norm clipping, as `torch.nn.utils.clip_grad_norm_` (L2, `error_if_nonfinite = False`).

use anyhow::Result;
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};

/// Added to the norm in the scale, as torch does, so a zero norm cannot divide by zero.
const NORM_EPS: f64 = 1e-6;

/// Total L2 norm of the gradients of `vars` (vars without a gradient count as zero). If it is finite and
/// `max_norm / (norm + 1e-6) < 1`, every gradient is scaled by that factor in `grads`. Returns the pre-clip norm;
/// a non-finite norm is returned with the gradients untouched, for the caller to skip the step.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let (norm, scale) = grad_norm_and_scale(grads, vars, max_norm)?;
    if let Some(scale) = scale {
        for (_, var) in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let scaled = (g * scale)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// A recipe's `max_grad_norm` as a norm limit: ≤ 0 means no clipping (an infinite limit).
pub fn norm_limit(max_grad_norm: f64) -> f64 {
    if max_grad_norm > 0.0 {
        max_grad_norm
    } else {
        f64::INFINITY
    }
}

/// One AdamW step of `vars` from `grads`, clipped to `max_grad_norm` (≤ 0 = off) inside the update. Returns the
/// pre-clip norm; a non-finite norm leaves the weights untouched, for the caller to skip the step.
pub fn clipped_step(
    optimizer: &mut crate::optim::AdamW,
    grads: &GradStore,
    vars: &[(String, Var)],
    max_grad_norm: f64,
) -> Result<f64> {
    let (norm, scale) = grad_norm_and_scale(grads, vars, norm_limit(max_grad_norm))?;
    if norm.is_finite() {
        optimizer.step_scaled(grads, scale)?;
    }
    Ok(norm)
}

/// The global L2 norm of the gradients of `vars`, and the factor that clips it to `max_norm` (None when no clipping
/// applies, including a non-finite norm), without changing the gradients: [`crate::optim::AdamW::step_scaled`]
/// applies the factor inside its update. Sums of squares are accumulated in f64 directly over the storage for CPU
/// f32 gradients (no squared copy of each gradient is made); on a GPU each gradient's sum of squares is an f32
/// reduction there (as torch's per-tensor norms are) and all of them come back in one read, not one per tensor.
pub fn grad_norm_and_scale(grads: &GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<(f64, Option<f64>)> {
    let mut sum_sq = 0.0f64;
    let mut on_device = Vec::new();
    for (_, var) in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            if crate::cpu::is_cpu_f32(g) {
                sum_sq += crate::cpu::with_f32(g, |g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())?;
            } else {
                on_device.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
            }
        }
    }
    if !on_device.is_empty() {
        let partial: Vec<f32> = Tensor::stack(&on_device, 0)?.to_device(&Device::Cpu)?.to_vec1()?;
        sum_sq += partial.iter().map(|&s| s as f64).sum::<f64>();
    }
    let norm = sum_sq.sqrt();
    let scale = max_norm / (norm + NORM_EPS);
    Ok((norm, (norm.is_finite() && scale < 1.0).then_some(scale)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn setup() -> (GradStore, Vec<(String, Var)>) {
        let dev = Device::Cpu;
        let a = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let b = Var::new(&[3.0f32], &dev).unwrap();
        // loss = 3·a0 + 4·a1 + 12·b → grads [3, 4] and [12]; norm √(9 + 16 + 144) = √169 = 13.
        let w = Tensor::new(&[3.0f32, 4.0], &dev).unwrap();
        let loss = ((a.as_tensor() * &w).unwrap().sum_all().unwrap()
            + (b.as_tensor() * 12.0).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        (grads, vec![("a".into(), a), ("b".into(), b)])
    }

    #[test]
    fn clip_grad_norm_hand_values() {
        // max_norm 6.5: scale = 6.5/(13 + 1e-6) = 0.49999996153846…; grads ≈ [1.5, 2.0], [6.0].
        let (mut grads, vars) = setup();
        let norm = clip_grad_norm(&mut grads, &vars, 6.5).unwrap();
        assert!((norm - 13.0).abs() < 1e-12);
        let scale = 6.5 / (13.0 + 1e-6);
        let ga = grads.get(vars[0].1.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let gb = grads.get(vars[1].1.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(ga, vec![(3.0 * scale) as f32, (4.0 * scale) as f32]);
        assert_eq!(gb, vec![(12.0 * scale) as f32]);
        // Below the threshold: untouched, norm still reported.
        let (mut grads, vars) = setup();
        assert!((clip_grad_norm(&mut grads, &vars, 100.0).unwrap() - 13.0).abs() < 1e-12);
        assert_eq!(grads.get(vars[0].1.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), vec![3.0, 4.0]);
    }

    #[test]
    fn gradients_off_the_fast_path_are_reduced_together_to_the_same_norm() {
        // f64 gradients skip the CPU f32 pass and take the device path (per-tensor sums, one read): still 13.
        let (mut grads, vars) = setup();
        for (_, v) in &vars {
            let g = grads.get(v.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
            grads.insert(v.as_tensor(), g);
        }
        let (norm, scale) = grad_norm_and_scale(&grads, &vars, 6.5).unwrap();
        assert!((norm - 13.0).abs() < 1e-6, "{norm}");
        assert!((scale.unwrap() - 6.5 / (13.0 + 1e-6)).abs() < 1e-7);
    }

    #[test]
    fn clip_grad_norm_non_finite_is_reported() {
        let (mut grads, vars) = setup();
        let bad = Tensor::new(&[f32::NAN], &Device::Cpu).unwrap();
        grads.insert(vars[1].1.as_tensor(), bad);
        let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        assert!(norm.is_nan());
        assert_eq!(grads.get(vars[0].1.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), vec![3.0, 4.0]);
    }
}
