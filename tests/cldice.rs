//! The soft-clDice term (`train.cldice`): the soft skeleton and the loss against hand-computed
//! examples, and its gradient against central differences in f64.

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use driveline::training::loss::{soft_cldice, soft_skeleton};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A 7×9 image [1, 1, 7, 9] with ones on `rows`.
fn rows_image(rows: &[usize]) -> Result<Tensor> {
    let mut v = vec![0f64; 7 * 9];
    for &r in rows {
        v[r * 9..(r + 1) * 9].fill(1.0);
    }
    Ok(Tensor::from_vec(v, (1, 1, 7, 9), &Device::Cpu)?)
}

fn rows_of(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.squeeze(0)?.squeeze(0)?.to_vec2::<f64>()?)
}

/// A bar three rows thick: the first opening restores it (nothing in the skeleton yet), the
/// first erosion leaves its middle row, which the next opening removes; so the skeleton is the
/// middle row. A line one pixel wide is its own skeleton.
#[test]
fn skeleton_of_a_bar_is_its_middle_row_and_a_line_its_own() -> Result<()> {
    let skel = soft_skeleton(&rows_image(&[2, 3, 4])?, 10)?;
    assert_eq!(rows_of(&skel)?, rows_of(&rows_image(&[3])?)?);
    let line = rows_image(&[5])?;
    assert_eq!(rows_of(&soft_skeleton(&line, 3)?)?, rows_of(&line)?);
    Ok(())
}

/// The prediction equals the target: both topology fractions are (9 + 1) / (9 + 1), loss 0.
/// A one-pixel line beside the bar: its skeleton (9 px) misses the bar and covers none of the
/// bar's skeleton (9 px), so both fractions are (0 + 1) / (9 + 1) = 0.1, clDice = 2·0.01/0.2 =
/// 0.1 and the loss is 0.9.
#[test]
fn cldice_loss_by_hand() -> Result<()> {
    let bar = rows_image(&[2, 3, 4])?;
    let same = soft_cldice(&bar, &bar, 10)?.to_scalar::<f64>()?;
    assert!(same.abs() < 1e-12, "{same}");
    let apart = soft_cldice(&rows_image(&[0])?, &bar, 10)?.to_scalar::<f64>()?;
    assert!((apart - 0.9).abs() < 1e-12, "{apart}");
    Ok(())
}

/// d loss / d p against central differences at every element of a random probability map,
/// with a target of two vessels and enough iterations to reach the skeleton's fixed point.
#[test]
fn cldice_gradient_matches_finite_differences() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let (h, w) = (9, 10);
    let p: Vec<f64> = (0..2 * h * w)
        .map(|_| rng.random_range(0.05..0.95))
        .collect();
    let t: Vec<f64> = (0..2 * h * w)
        .map(|i| {
            let (y, x) = ((i / w) % h, i % w);
            f64::from(u8::from((3..6).contains(&y) || x == 7))
        })
        .collect();
    let dev = Device::Cpu;
    let t = Tensor::from_vec(t, (2, 1, h, w), &dev)?;
    let pv = Var::from_tensor(&Tensor::from_vec(p.clone(), (2, 1, h, w), &dev)?)?;
    let loss = soft_cldice(pv.as_tensor(), &t, 4)?;
    let g: Vec<f64> = loss
        .backward()?
        .get(&pv)
        .expect("gradient of p")
        .flatten_all()?
        .to_vec1()?;
    let at = |q: Vec<f64>| -> Result<f64> {
        Ok(soft_cldice(&Tensor::from_vec(q, (2, 1, h, w), &dev)?, &t, 4)?.to_scalar::<f64>()?)
    };
    let eps = 1e-6;
    let mut nonzero = 0;
    for j in 0..p.len() {
        let (mut up, mut down) = (p.clone(), p.clone());
        up[j] += eps;
        down[j] -= eps;
        let num = (at(up)? - at(down)?) / (2.0 * eps);
        assert!(
            (num - g[j]).abs() <= 1e-6 * (1.0 + num.abs()),
            "element {j}: analytic {} vs numeric {num}",
            g[j]
        );
        nonzero += usize::from(g[j] != 0.0);
    }
    // The check means something only if the skeleton path carries gradient to many pixels.
    assert!(
        nonzero > p.len() / 2,
        "{nonzero} of {} gradients are non-zero",
        p.len()
    );
    Ok(())
}
